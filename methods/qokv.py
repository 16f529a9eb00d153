"""QoKV: token grouping by average attention score with mixed bit widths, plus channel scaling.

Two components, each switchable:

1. **Token grouping.** The importance of a token is the *average attention score it receives*:
   the attention probabilities of the layer summed over the queries that see the token, divided by
   how many queries do, and averaged over the query heads. Tokens are ranked by that score and
   split into groups (``group_shares``, most important first, or ``group_thresholds`` on the score
   relative to its mean); group ``g`` stores keys at ``kv.bits + key_bit_offsets[g]`` and values at
   ``kv.bits + value_bit_offsets[g]`` bits (clamped to ``min_bits``..8). ``grouping=online`` (the default)
   computes the scores per sequence from the real attention probabilities of the current forward
   (post-RoPE queries and unquantized keys, causal mask, scaling ``1/sqrt(head_dim)``);
   ``grouping=offline`` uses a per-layer position -> group map computed once from calibration
   attention (the original code's ``Get_group`` step); ``grouping=none`` turns the component off.
   ``top_initial`` / ``top_recent`` force the first / most recent tokens into the top group.

2. **Channel balancing** (QoKV's per-channel scaling, with Outlier-Suppression+'s shift). Per
   layer, KV head and channel, offline from the calibration split (the original's ``Scale_get``
   step): a shift ``z`` (``shift_keys`` / ``shift_values``: ``mid`` = midpoint of the calibration
   range) and a scale ``s``. The cache stores ``Q((x - z) / s)`` and reads ``z + s * Q(...)``, so with
   quantization off the model is unchanged. ``s`` is equivalent to folding it into the query (keys)
   or into the output projection's input columns (values) (:func:`fold_channel_scales` does the
   folding on the weights, for post-RoPE keys); ``z`` is a per-channel zero point stored once per
   layer. Scale rule: ``s_j = m_j ** alpha`` (normalised to geometric mean 1), ``m_j = max |x_j - z_j|``
   over the calibration tokens, i.e. the SmoothQuant family ``max|X_j|^alpha / max|W_j|^(1-alpha)``
   with the other side set to 1: in kvbench the query / output path is not quantized, so nothing is
   gained by moving difficulty there. For keys the strength is searched per layer and KV head
   (QoKV's Outlier-Suppression+-style range search), scoring each candidate by the Fisher-weighted
   error of ``s * Q(x / s)``; values use ``alpha = 1``. Keys are balanced and quantized *before* RoPE
   by default (``pre_rope``): the large key channels have a fixed sign and offset only there (RoPE
   rotates them into their pair channel), which is what makes the shift work. Post-RoPE key scales
   are tied over the rotary pairs ``(j, j + D/2)`` so the folding commutes with RoPE.
   Defaults, from measurements on SmolLM2 (README, QoKV section).

The base quantizer is uniform asymmetric per-token (grouped by ``kv.group_size`` channels), or
KVQuant's non-uniform codebooks on the same per-token ranges (``base=nuq``, a composition no paper
has run).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

import torch

from kvbench.errors import UserError
from kvbench.method import FP16_BITS, KVMethod, MethodConfig
from kvbench.quant import (
    SCALE_ZERO_BITS,
    denormalize,
    dequantize_codebook,
    fake_quantize_affine,
    kmeans_1d,
    normalize,
    quantize_codebook,
)
from kvbench.methods.components.balancing import Shift, channel_scales, channel_shift, fold_channel_scales, search_alpha  # noqa: F401
from kvbench.methods.components.layer_bits import candidate_widths
from kvbench.methods.components.grouping import assign_groups, group_counts, received_attention, threshold_groups  # noqa: F401
from kvbench.registry import register



class Grouping(StrEnum):
    online = "online"
    offline = "offline"
    none = "none"


class Base(StrEnum):
    uniform = "uniform"
    nuq = "nuq"


@dataclass
class QoKVConfig(MethodConfig):
    """QoKV hyperparameters (the defaults are the configuration the README reports).

    Attributes:
        grouping: ``online`` (scores from the current sequence), ``offline`` (calibrated
            position -> group map per layer) or ``none`` (one group at ``kv.bits``).
        group_shares: token share of each group, most important first; sums to 1.
        group_thresholds: instead of shares, ``len(group_shares) - 1`` descending thresholds on the
            score divided by its mean over the tokens quantized together.
        key_bit_offsets: key bit width of each group relative to ``kv.bits``.
        value_bit_offsets: value bit width of each group relative to ``kv.bits``.
        min_bits: no group goes below this width (1-bit per-token codes keep only a sign).
        top_initial: first tokens of the sequence always in the top group.
        top_recent: most recent tokens (at quantization time) always in the top group.
        scale_keys: per-channel key scaling (calibrated).
        scale_values: per-channel value scaling (calibrated).
        shift_keys: per-channel key shift before scaling and quantization: ``none``, ``mid``
            (midpoint of the calibration range) or ``mean``.
        shift_values: the same for values.
        key_alpha: key scaling strength, ``s_j = max|k_j - z_j| ** alpha`` (0 = no scaling, 1 = equalised
            ranges); ``None``: chosen per layer and KV head from a grid, minimising the
            Fisher-weighted quantization error on the calibration split (:func:`search_alpha`).
        value_alpha: the same for values.
        tie_rope_pairs: tie key scales over rotary pairs so they fold into the weights exactly.
        pre_rope: quantize (and scale) keys before the rotary embedding.
        base: base quantizer of every group: ``uniform`` per-token grouped, or ``nuq``: the same
            per-token ranges with a per-layer non-uniform codebook of each width, learned by
            (Fisher-weighted) k-means on the scaled calibration data (KVQuant's NUQ).
        sink_tokens: the shared attention-sink component (first tokens kept in fp16), on by default.
    """

    name: str = "qokv"
    grouping: Grouping = Grouping.online
    group_shares: list[float] = field(default_factory=lambda: [0.1, 0.6, 0.3])
    group_thresholds: Optional[list[float]] = None
    key_bit_offsets: list[int] = field(default_factory=lambda: [0, 0, 0])
    value_bit_offsets: list[int] = field(default_factory=lambda: [1, 0, -1])
    min_bits: int = 2
    top_initial: int = 1
    top_recent: int = 0
    scale_keys: bool = True
    scale_values: bool = True
    shift_keys: Shift = Shift.mid
    shift_values: Shift = Shift.none
    key_alpha: Optional[float] = None
    value_alpha: Optional[float] = 1.0
    tie_rope_pairs: bool = True
    pre_rope: bool = True
    base: Base = Base.uniform
    sink_tokens: int = 1


@functools.cache
def _widths(widths: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(widths)


@register("method", "qokv")
class QoKV(KVMethod):
    config_class = QoKVConfig
    version = 2  # 2: fitted without the sink tokens

    def __init__(self, cfg, kv, info):
        super().__init__(cfg, kv, info)
        G = len(cfg.group_shares)
        if len(cfg.key_bit_offsets) != G or len(cfg.value_bit_offsets) != G:
            raise UserError(f"method.key_bit_offsets and value_bit_offsets need one entry per group ({G})")
        if any(s < 0 for s in cfg.group_shares) or abs(sum(cfg.group_shares) - 1) > 1e-6:
            raise UserError(f"method.group_shares must be non-negative and sum to 1, got {list(cfg.group_shares)}")
        if cfg.group_thresholds is not None and len(cfg.group_thresholds) != G - 1:
            raise UserError(f"method.group_thresholds needs {G - 1} entries (one fewer than groups)")
        self.pre_rope = cfg.pre_rope
        self.needs_query = cfg.grouping == "online"
        self.n_groups = G if cfg.grouping != "none" else 1
        self.shares = torch.tensor(list(cfg.group_shares) if cfg.grouping != "none" else [1.0], dtype=torch.float64)
        offs_k = list(cfg.key_bit_offsets) if cfg.grouping != "none" else [0]
        offs_v = list(cfg.value_bit_offsets) if cfg.grouping != "none" else [0]
        self.offsets = {"k": offs_k, "v": offs_v}
        self.key_bits = [self._width(o) for o in offs_k]
        self.value_bits = [self._width(o) for o in offs_v]
        if self.allocates_bits:  # method.layer_bits allocates the base width (kv.bits) of each layer
            self.bit_widths = candidate_widths(kv.bits, cfg.layer_bit_choices, floor=cfg.min_bits)
        self.key_scales: Optional[torch.Tensor] = None  # (L, H_kv, D)
        self.value_scales: Optional[torch.Tensor] = None  # (L, H_kv, D)
        self.key_shifts: Optional[torch.Tensor] = None  # (L, H_kv, D)
        self.value_shifts: Optional[torch.Tensor] = None  # (L, H_kv, D)
        self.offline_groups: Optional[torch.Tensor] = None  # (L, T_calib)
        self.tokens_per_group = torch.zeros(self.n_groups, dtype=torch.float64)  # realised, for avg bits
        self.codebooks: dict[str, dict[int, torch.Tensor]] = {}  # base=nuq: {"key"|"value": {bits: (L, 2**bits)}}

    def _width(self, offset: int, base: Optional[int] = None) -> int:
        if self.kv.bits >= FP16_BITS:
            return FP16_BITS
        return int(min(8, max(self.cfg.min_bits, (self.kv.bits if base is None else base) + offset)))

    def _widths(self, which: str, layer: int) -> list[int]:
        """Width of each token group of ``which`` (``"k"``/``"v"``) in ``layer``."""
        base = self.width(which, layer)
        return [self._width(o, base) for o in self.offsets[which]]

    def _all_widths(self, which: str) -> list[int]:
        """Every width ``which`` may take in any layer (the codebooks to learn)."""
        if not self.allocates_bits:
            return sorted(set(self.key_bits if which == "k" else self.value_bits))
        return sorted({self._width(o, b) for b in self.bit_widths for o in self.offsets[which]})

    # -- calibration -----------------------------------------------------------------------------
    def calibration_needs(self):
        needs = set()
        if self.cfg.scale_keys:
            needs.add("keys" if self.cfg.pre_rope else "keys_post")
        if self.cfg.scale_values:
            needs.add("values")
        if self.cfg.shift_keys != "none":
            needs.add("keys" if self.cfg.pre_rope else "keys_post")
        if self.cfg.shift_values != "none":
            needs.add("values")
        if self.cfg.grouping == "offline":
            needs.add("attention")
        if self.cfg.base == "nuq":
            needs |= {"keys" if self.cfg.pre_rope else "keys_post", "values", "fisher"}
        if (self.cfg.scale_keys and self.cfg.key_alpha is None) or (self.cfg.scale_values and self.cfg.value_alpha is None):
            needs.add("fisher")  # dropped by the pipeline when calib.fisher=false (plain squared error)
        return frozenset(needs) | self.layer_bits_needs()

    def _scales(self, xs: list, fisher: Optional[list], alpha: Optional[float], tie: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales ``(L, H_kv, D)`` and strengths ``(L, H_kv)`` of every layer."""
        scales, alphas = [], []
        for i, x in enumerate(xs):
            if alpha is None:  # search (at kv.bits; any alpha is exact with quantization off)
                bits = min(self.kv.bits, 8)
                a = search_alpha(x, None if fisher is None else fisher[i], bits, self.kv.group_size, tie)
            else:
                a = torch.full((x.shape[1],), float(alpha))
            alphas.append(a)
            scales.append(channel_scales(x, a, tie))
        return torch.stack(scales), torch.stack(alphas)

    def _normalized(self, y: torch.Tensor):
        """Per-token ranges of ``y (..., D)`` in groups of ``kv.group_size`` channels -> ``(y_n, lo, hi)``."""
        g = self.kv.group_size or y.shape[-1]
        yg = y.reshape(*y.shape[:-1], y.shape[-1] // g, g)
        lo, hi = yg.amin(-1, keepdim=True), yg.amax(-1, keepdim=True)
        return normalize(yg, lo, hi), lo, hi

    def _codebooks(self, xs: list, fisher: Optional[list], scales: Optional[torch.Tensor], widths: list[int],
                   max_samples: int = 1 << 18) -> dict[int, torch.Tensor]:
        """Per-layer codebooks ``{bits: (L, 2**bits)}`` for the NUQ base quantizer."""
        out = {}
        for bits in sorted({b for b in widths if b < FP16_BITS}):
            books = []
            for i, x in enumerate(xs):  # (N, H_kv, T, D)
                y = x if scales is None else x / scales[i][None, :, None, :]
                yn = self._normalized(y)[0].flatten()
                w = None if fisher is None else fisher[i].flatten()
                step = max(1, yn.numel() // max_samples)
                books.append(kmeans_1d(yn[::step], 2**bits, None if w is None else w[::step]))
            out[bits] = torch.stack(books)
        return out

    def calibrate(self, stats, device=None):
        stats = self.rotation.statistics(stats)  # everything below fits what is quantized
        proxy = lambda x, which, b: fake_quantize_affine(x, b, dim=-1, group_size=self.kv.group_size)  # noqa: E731
        out = self.fit_layer_bits(stats, proxy)
        tie = self.cfg.tie_rope_pairs and not self.cfg.pre_rope
        name = "keys" if self.cfg.pre_rope else "keys_post"
        keys, values = stats.get(name), stats.get("values")
        if self.cfg.shift_keys != "none":
            out["key_shifts"] = torch.stack([channel_shift(x, self.cfg.shift_keys) for x in keys])
            keys = [x - z[None, :, None, :] for x, z in zip(keys, out["key_shifts"])]
        if self.cfg.shift_values != "none":
            out["value_shifts"] = torch.stack([channel_shift(x, self.cfg.shift_values) for x in values])
            values = [x - z[None, :, None, :] for x, z in zip(values, out["value_shifts"])]
        if self.cfg.scale_keys:
            out["key_scales"], out["key_alpha"] = self._scales(keys, stats.get(f"fisher_{name}"), self.cfg.key_alpha, tie)
        if self.cfg.scale_values:
            out["value_scales"], out["value_alpha"] = self._scales(values, stats.get("fisher_values"), self.cfg.value_alpha, False)
        if self.cfg.base == "nuq":
            for which, xs, fish, widths in (("key", keys, stats.get(f"fisher_{name}"), self._all_widths("k")),
                                            ("value", values, stats.get("fisher_values"), self._all_widths("v"))):
                books = self._codebooks(xs, fish, out.get(f"{which}_scales"), widths)
                out.update({f"{which}_codebook{b}": cb for b, cb in books.items()})
        if self.cfg.grouping == "offline":
            maps = []
            for a in stats["attention"]:  # (N, H_q, T)
                score = a.float().mean(dim=(0, 1))[None]  # (1, T)
                T = score.shape[-1]
                maps.append(self._groups_of(score, 0, T, T)[0])
            out["groups"] = torch.stack(maps).to(torch.int64)  # (L, T_calib)
        return out

    def state_shapes(self):
        """What :meth:`calibrate` returns: shifts and scales ``(L, H_kv, D)``, strengths ``(L, H_kv)``,
        codebooks ``(L, 2**b)`` per width ``b``, offline groups ``(L, T_calib)``."""
        L, H, D = self.info.num_layers, self.info.num_kv_heads, self.info.head_dim
        out = self.layer_bits_shapes()
        for which in ("key", "value"):
            if getattr(self.cfg, f"shift_{which}s") != "none":
                out[f"{which}_shifts"] = (L, H, D)
            if getattr(self.cfg, f"scale_{which}s"):
                out[f"{which}_scales"], out[f"{which}_alpha"] = (L, H, D), (L, H)
            if self.cfg.base == "nuq":
                widths = self._all_widths(which[0])
                out.update({f"{which}_codebook{b}": (L, 2**b) for b in sorted(set(widths)) if b < FP16_BITS})
        if self.cfg.grouping == "offline":
            out["groups"] = (L, None)
        return out

    def load_state(self, tensors):
        self.layer_widths = tensors.get("layer_bits")
        self.codebooks = {w: {int(k.rsplit("codebook", 1)[1]): v for k, v in tensors.items() if k.startswith(f"{w}_codebook")}
                          for w in ("key", "value")}
        self.key_scales = tensors.get("key_scales")
        self.value_scales = tensors.get("value_scales")
        self.key_shifts = tensors.get("key_shifts")
        self.value_shifts = tensors.get("value_shifts")
        self.offline_groups = tensors.get("groups")

    # -- grouping --------------------------------------------------------------------------------
    def _forced(self, lo: int, hi: int, total: int) -> torch.Tensor:
        """``(hi - lo,)`` bool on the host: the grouping counts them without waiting for the device."""
        pos = torch.arange(lo, hi)
        return (pos < self.cfg.top_initial) | (pos >= total - self.cfg.top_recent)

    def _groups_of(self, scores: torch.Tensor, lo: int, hi: int, total: int) -> torch.Tensor:
        forced = self._forced(lo, hi, total)
        if self.cfg.group_thresholds is not None:
            return threshold_groups(scores, list(self.cfg.group_thresholds), forced)
        return assign_groups(scores, group_counts(self.shares, lo, hi), forced)

    def groups(self, layer: int, B: int, n: int, ctx) -> torch.Tensor:
        """Group of every token handed to the method, ``(B, n)`` int64 (0 = top group)."""
        if self.n_groups == 1:
            return torch.zeros(B, n, dtype=torch.long)
        lo = ctx.start if ctx is not None else 0
        hi = lo + n
        total = ctx.keys.shape[-2] if ctx is not None and ctx.keys is not None else hi
        if self.cfg.grouping == "offline":
            if self.offline_groups is None:
                raise RuntimeError("qokv: offline grouping needs calibration (load_state was not called)")
            gmap = self.offline_groups[layer]  # (T_calib,)
            pos = torch.arange(lo, hi)
            g = torch.full((n,), self.n_groups - 1, dtype=torch.long)  # beyond the calibrated length: last group
            inside = pos < gmap.numel()
            g[inside] = gmap[pos[inside]].long()
            g = torch.where(self._forced(lo, hi, total), torch.zeros_like(g), g)
            return g.expand(B, n)
        if ctx is None or ctx.query is None or ctx.keys is None:
            raise RuntimeError("qokv: online grouping needs the layer's queries (KVContext.query)")
        scores = received_attention(ctx.query, ctx.keys, ctx.query_start, lo, hi)  # (B, n)
        return self._groups_of(scores, lo, hi, total)

    def _groups_for(self, x: torch.Tensor, layer: int, ctx) -> torch.Tensor:
        """Token groups ``(B, n)`` of the chunk ``x (B, H_kv, n, D)``; realised shares are counted here."""
        g = self.groups(layer, x.shape[0], x.shape[-2], ctx).to(x.device, non_blocking=True)
        flat = g.flatten()  # counted on the device (bincount would wait for it, to size its output)
        counts = torch.zeros(self.n_groups, dtype=torch.float64, device=g.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float64))
        self.tokens_per_group = counts + self.tokens_per_group.to(counts.device, non_blocking=True)
        return g

    # -- quantization ----------------------------------------------------------------------------
    def _base(self, y: torch.Tensor, bits: int, which: str, layer: int) -> torch.Tensor:
        """Per-token base quantizer of ``y (B, H_kv, n, D)`` at ``bits``."""
        if self.cfg.base == "uniform" or bits >= FP16_BITS:
            return fake_quantize_affine(y, bits, dim=-1, group_size=self.kv.group_size)
        books = self.codebooks.get(which, {})
        if bits not in books:
            raise RuntimeError(f"qokv: base=nuq needs a {bits}-bit {which} codebook from calibration")
        cb = books[bits][layer].to(y)
        yn, lo, hi = self._normalized(y)
        return denormalize(dequantize_codebook(quantize_codebook(yn, cb), cb), lo, hi).reshape(y.shape)

    def _quantize(self, x: torch.Tensor, groups: torch.Tensor, widths: list[int], scales, shifts, which: str,
                  layer: int) -> torch.Tensor:
        """``x (B, H_kv, n, D)`` -> ``z + s * Q_g((x - z) / s)`` with each token's group width; ``groups (B, n)``."""
        from kvbench.kernels import fused_simulated

        if self.cfg.base == "uniform" and max(widths) <= 8 and fused_simulated(x, self.kv.group_size):
            from kvbench.kernels.triton.simulated import fake_quant_tokens

            token_bits = self.on_device(f"widths{widths}", _widths(tuple(widths)), x.device)[groups]  # (B, n)
            return fake_quant_tokens(x, token_bits=token_bits, group=self.kv.group_size, shift=shifts, scale=scales)
        s = None if scales is None else scales[None, :, None, :]  # (1, H_kv, 1, D)
        z = None if shifts is None else shifts[None, :, None, :]
        y = x.float() if z is None else x.float() - z
        y = y if s is None else y / s
        out = torch.empty_like(y)
        for g, bits in enumerate(widths):
            mask = (groups == g)[:, None, :, None]  # (B, 1, n, 1)
            if mask.any():
                out = torch.where(mask, self._base(y, bits, which, layer), out)
        out = out if s is None else out * s
        return (out if z is None else out + z).to(x.dtype)

    def _channel(self, name: str, layer: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Layer ``layer`` of a calibrated ``(L, H_kv, D)`` vector, fp32 on ``like``'s device (copied once)."""
        t = getattr(self, name)
        return None if t is None else self.on_device(name, t, like.device)[layer]

    def _keys(self, k, g, layer):
        ks, kz = self._channel("key_scales", layer, k), self._channel("key_shifts", layer, k)
        return self._quantize(k, g, self._widths("k", layer), ks, kz, "key", layer)

    def _values(self, v, g, layer):
        vs, vz = self._channel("value_scales", layer, v), self._channel("value_shifts", layer, v)
        return self._quantize(v, g, self._widths("v", layer), vs, vz, "value", layer)

    def quantize_kv(self, k, v, layer, ctx=None):
        g = self._groups_for(k, layer, ctx)  # (B, n): one decision for the chunk's keys and values
        return (self.rotation.around("k", k, lambda y: self._keys(y, g, layer)),
                self.rotation.around("v", v, lambda y: self._values(y, g, layer)))

    def quantize_keys(self, k, layer, ctx=None):
        g = self._groups_for(k, layer, ctx)
        return self.rotation.around("k", k, lambda y: self._keys(y, g, layer))

    def quantize_values(self, v, layer, ctx=None):
        g = self._groups_for(v, layer, ctx)
        return self.rotation.around("v", v, lambda y: self._values(y, g, layer))

    # -- packed format (kv.backend=kernel) --------------------------------------------------------
    def check_packable(self) -> None:
        from kvbench.kernels.reference import bit_slices

        if self.kv.bits >= FP16_BITS:
            raise UserError(f"kv.backend=kernel packs codes of at most 8 bits, got kv.bits={self.kv.bits}")
        for bits in sorted({*self.key_bits, *self.value_bits}):  # the groups' widths (method.*_bit_offsets)
            try:
                bit_slices(bits, self.info.head_dim)
            except ValueError as e:
                raise UserError(f"kv.backend=kernel cannot pack QoKV's {bits}-bit token group here (method.key_bit_offsets"
                                f" / method.value_bit_offsets): {e}") from None

    def packed_spec(self):
        """The packed format: keys and values per token (ranges per ``kv.group_size`` channels) of
        ``(x - shift) / scale`` with the calibrated channel shifts and scales (the kernel maps keys back in
        its tile, before RoPE, and folds the values' into its output), pre-RoPE keys if ``pre_rope``, and
        one store per ``(key width, value width)`` of the token groups, each token in its group's store
        with its position; the groups are decided as in the simulated backend (:meth:`groups`)."""
        from kvbench.cache import PackedCacheSpec
        from kvbench.kernels.ops import codebook_from_unit

        self.check_packable()
        L, group = self.info.num_layers, self.kv.group_size or self.info.head_dim
        pairs = list(zip(self.key_bits, self.value_bits))

        def chan(scales, shifts):
            if scales is None and shifts is None:
                return None
            return [(None if scales is None else scales[i], None if shifts is None else shifts[i]) for i in range(L)]

        def books(which):
            if self.cfg.base != "nuq":
                return None
            return [{b: codebook_from_unit(cb[i], b) for b, cb in self.codebooks.get(which, {}).items()} for i in range(L)]

        return PackedCacheSpec(
            key_bits=pairs[0][0], value_bits=pairs[0][1], key_axis="token", key_group_size=group,
            value_group_size=group, pre_rope=self.cfg.pre_rope,
            key_channel=chan(self.key_scales, self.key_shifts), value_channel=chan(self.value_scales, self.value_shifts),
            key_codebooks=books("key"), value_codebooks=books("value"),
            group_bits=pairs if self.n_groups > 1 else None,
            token_groups=self._groups_for if self.n_groups > 1 else None,
        )

    # -- accounting ------------------------------------------------------------------------------
    def group_fractions(self) -> torch.Tensor:
        """Realised share of tokens per group (declared shares before any token was quantized)."""
        counts = self.tokens_per_group.cpu()
        n = counts.sum()
        return counts / n if n > 0 else self.shares.double()

    def bits_per_element(self, seq_len: int):
        if self.kv.bits >= FP16_BITS:
            return float(FP16_BITS), float(FP16_BITS)
        f = self.group_fractions()
        per_group = self.kv.group_size or self.info.head_dim
        overhead = SCALE_ZERO_BITS / per_group
        if self.n_groups > 1:  # group id of every token of a layer, shared by its K and V of all heads
            overhead += math.ceil(math.log2(self.n_groups)) / (2 * self.info.num_kv_heads * self.info.head_dim)
        kb = float(sum(fi * b for fi, b in zip(f.tolist(), self._mean_widths("k")))) + overhead
        vb = float(sum(fi * b for fi, b in zip(f.tolist(), self._mean_widths("v")))) + overhead
        return kb, vb

    def _mean_widths(self, which: str) -> list[float]:
        """Width of each group averaged over the layers (the allocation's, once calibrated)."""
        if not self.allocates_bits or self.layer_widths is None:
            return [float(b) for b in (self.key_bits if which == "k" else self.value_bits)]
        per_layer = [self._widths(which, i) for i in range(self.info.num_layers)]  # (L, G)
        return torch.tensor(per_layer, dtype=torch.float64).mean(0).tolist()

    def avg_bits(self, seq_len: int) -> float:
        """Base accounting plus what is stored once per layer, amortised over the ``seq_len``
        tokens of a sequence: the channel scales and shifts (one fp16 each per KV head and channel,
        of K and of V) and, with ``base=nuq``, the fp16 codebooks."""
        if self.kv.bits >= FP16_BITS:
            return super().avg_bits(seq_len)
        per_layer = 2 * self.info.num_kv_heads * self.info.head_dim * seq_len  # K and V elements of a layer
        vectors = sum(map(int, (self.cfg.scale_keys, self.cfg.scale_values,
                                self.cfg.shift_keys != "none", self.cfg.shift_values != "none")))
        static = vectors * self.info.num_kv_heads * self.info.head_dim
        if self.cfg.base == "nuq":  # one fp16 codebook per layer, K/V and width
            static += sum(2**b for b in self._all_widths("k")) + sum(2**b for b in self._all_widths("v"))
        return super().avg_bits(seq_len) + static * FP16_BITS / per_layer
