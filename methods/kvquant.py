"""KVQuant (Hooper et al., 2024, arXiv 2401.18079), built from switchable components.

==========================  ====================================  ======================================
component                   override                              what it does
==========================  ====================================  ======================================
pre-RoPE keys               ``method.pre_rope=true``              keys quantized before the rotary
                                                                  embedding (the cache rotates back)
per-channel keys            ``method.key_axis=channel``           one range per head and channel,
                                                                  calibrated offline (``token``:
                                                                  per-token ranges, online)
NUQ                         ``method.nuq=true``                   per-layer codebook from k-means on
                                                                  normalized calibration K/V
Fisher weighting            ``calib.fisher=true``                 k-means weighted by the squared
                                                                  gradients of the LM loss
dense-and-sparse            ``method.outlier_frac=0.01``          top 0.5 % + bottom 0.5 % kept in fp16
                                                                  (keys: per-channel thresholds,
                                                                  offline; values: per token, online)
keys-only outliers          ``method.value_outliers=false``       dense-and-sparse for keys only
Q-Norm                      ``method.qnorm=true``                 codebook moment-matched to the
                                                                  calibration data (free at run time)
attention sink              ``method.sink_tokens=1``              first token kept in fp16 (shared)
==========================  ====================================  ======================================

Values are always quantized per token (a range per token, head and ``kv.group_size`` channels of
the dense part, computed online; outliers chosen per token over all heads). Everything is
simulated: quantize, then dequantize in fp32. A uniform ``b``-bit quantizer is the codebook
``linspace(-1, 1, 2**b)`` in the same normalized space, so turning NUQ off changes nothing else.

``kv.backend=kernel`` stores the same numbers packed (:meth:`KVQuant.packed_spec`): codes, the
calibrated per-channel key ranges (or per-token key ranges), the codebooks (Q-Norm is folded into
them), CSR key and value outliers, pre-RoPE keys and the sink tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvbench.errors import UserError
from kvbench.method import FP16_BITS, Axis, KVMethod, MethodConfig
from kvbench.quant import (
    SCALE_ZERO_BITS,
    denormalize,
    dequantize_codebook,
    fake_quantize_affine,
    kmeans_1d,
    normalize,
    outlier_mask,
    outlier_thresholds,
    outliers_per_side,
    q_norm,
    quantize_codebook,
    uniform_codebook,
)
from kvbench.registry import register

OUTLIER_BITS = 32  # one fp16 value + one 16-bit index per sparse outlier (as the paper counts)
PACKED_KEY_BLOCK = 128  # kv.backend=kernel: tokens per stored copy of the calibrated key scales


@dataclass
class KVQuantConfig(MethodConfig):
    """KVQuant's hyperparameters; the defaults are the paper's method (``nuq<bits>-1%``, one sink).

    Attributes:
        pre_rope: quantize keys before the rotary embedding.
        key_axis: ``channel`` (offline-calibrated per-channel ranges) or ``token`` (online).
        nuq: non-uniform codebooks learned by k-means (Fisher-weighted when ``calib.fisher``).
        outlier_frac: total fraction of each slice kept in fp16 (0.01 = top 0.5 % + bottom 0.5 %).
        qnorm: moment-match the codebooks to the calibration data (Q-Norm; used at 2 bits).
        value_outliers: apply ``outlier_frac`` to values too (``false``: keys only).
    """

    name: str = "kvquant"
    sink_tokens: int = 1
    pre_rope: bool = True
    key_axis: Axis = Axis.channel
    nuq: bool = True
    outlier_frac: float = 0.01
    qnorm: bool = False
    value_outliers: bool = True


@functools.cache
def _uniform_codebook(bits: int) -> torch.Tensor:
    return uniform_codebook(bits)


@register("method", "kvquant")
class KVQuant(KVMethod):
    config_class = KVQuantConfig
    version = 1

    def __init__(self, cfg, kv, info):
        super().__init__(cfg, kv, info)
        if not 0 <= cfg.outlier_frac < 0.5:
            raise UserError(f"method.outlier_frac must be in [0, 0.5), got {cfg.outlier_frac}")
        if cfg.qnorm and not cfg.nuq:
            raise UserError("method.qnorm=true needs method.nuq=true (Q-Norm corrects the NUQ codebook)")
        if getattr(kv, "backend", "simulated") == "kernel":
            self.check_packable()  # before calibration, which may take minutes
        self.pre_rope = bool(cfg.pre_rope)  # read by the cache
        self.key_block = 1  # key ranges are offline (channel) or per token: no block needed
        self.bits = kv.bits
        self.group = kv.group_size or info.head_dim
        self.state: dict[str, torch.Tensor] = {}
        self.outlier_count = {"k": 0, "v": 0}  # measured at run time, for honest bit counts
        self.element_count = {"k": 0, "v": 0}

    # -- calibration ---------------------------------------------------------------------------
    @property
    def quantizes(self) -> bool:
        return self.bits < FP16_BITS

    def calibration_needs(self) -> frozenset[str]:
        if not self.quantizes or (self.cfg.key_axis == "token" and not self.cfg.nuq):
            return self.layer_bits_needs()
        needs = {"keys" if self.pre_rope else "keys_post"}
        if self.cfg.nuq:
            needs |= {"values", "fisher"}
        return frozenset(needs) | self.layer_bits_needs()

    def calibrate(self, stats: dict, device=None) -> dict[str, torch.Tensor]:
        """Per-channel key thresholds and per-layer codebooks from calibration statistics.

        Args:
            stats: :func:`kvbench.calibration.collect` output: lists over layers of ``(N, H_kv, T, D)``
                keys (pre- or post-RoPE), values and, optionally, their squared gradients.
            device: where each layer's thresholds and k-means run (the model's device: on a GPU the sort
                of a layer's millions of samples takes milliseconds instead of seconds); results on the host.

        Returns:
            ``k_lo.{l}``, ``k_hi.{l}`` ``(H_kv, D)`` (per-channel keys) and ``k_cb.{l}``,
            ``v_cb.{l}`` ``(2**bits,)`` (NUQ) for every layer ``l``; with ``method.layer_bits``,
            ``layer_bits`` ``(L, 2)`` and codebooks of each layer's width. With ``method.rotation``
            everything is fitted on the rotated statistics.
        """
        stats = self.rotation.statistics(stats)
        kname = "keys" if self.pre_rope else "keys_post"
        keys = stats[kname]
        out: dict[str, torch.Tensor] = self.fit_layer_bits(stats, self._proxy)
        for layer in tqdm(range(len(keys)), desc="kvquant fit", leave=False):
            k = keys[layer].to(device)  # (N, H_kv, T, D), sink tokens already left out (calibration.without_sink)
            if self.cfg.key_axis == "channel":
                flat = k.permute(1, 3, 0, 2).flatten(2)  # (H_kv, D, N*T)
                lo, hi = (t.cpu() for t in outlier_thresholds(flat, self.cfg.outlier_frac))
                out[f"k_lo.{layer}"], out[f"k_hi.{layer}"] = lo, hi
                self.state.update({f"k_lo.{layer}": lo, f"k_hi.{layer}": hi})
            if not self.cfg.nuq:
                continue
            for which, x in (("k", k), ("v", stats["values"][layer].to(device))):
                fkey = {"k": f"fisher_{kname}", "v": "fisher_values"}[which]
                fisher = stats[fkey][layer].to(device) if fkey in stats else None
                y, dense = self._normalized(x, which, layer)
                w = fisher[dense] if fisher is not None else None
                cb = kmeans_1d(y[dense], 2 ** self.width(which, layer), w)
                if self.cfg.qnorm:
                    yd = y[dense]
                    a, b = q_norm(dequantize_codebook(quantize_codebook(yd, cb), cb), yd)
                    cb = (cb * a + b).sort().values
                out[f"{which}_cb.{layer}"] = cb.cpu()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self._state_names() if n not in tensors]
        if missing:
            raise UserError(f"kvquant calibration artifact lacks {missing[:3]} (stale artifact?)")
        self.layer_widths = tensors.get("layer_bits")
        self.state = {n: t.float() for n, t in tensors.items() if n != "layer_bits"}

    def state_shapes(self):
        """What :meth:`calibrate` returns: per-channel key thresholds ``(H_kv, D)`` and codebooks
        ``(2**bits,)`` for every layer."""
        shapes = self.layer_bits_shapes()  # with it, each layer's codebook has its own width
        cb = (None,) if shapes else (2**self.bits,)
        for name in self._state_names():
            shapes[name] = cb if "_cb." in name else (self.info.num_kv_heads, self.info.head_dim)
        return shapes

    def _state_names(self) -> list[str]:
        names = []
        if not self.calibration_needs():
            return names
        for layer in range(self.info.num_layers):
            if self.cfg.key_axis == "channel":
                names += [f"k_lo.{layer}", f"k_hi.{layer}"]
            if self.cfg.nuq:
                names += [f"k_cb.{layer}", f"v_cb.{layer}"]
        return names

    # -- quantization --------------------------------------------------------------------------
    def _ranges(self, x: torch.Tensor, which: str, layer: int):
        """Ranges and outliers of ``x (B, H_kv, T, D)``: returns ``lo, hi`` broadcastable to
        ``(B, H_kv, T, D/g, g)`` and the outlier mask ``(B, H_kv, T, D)``."""
        B, H, T, D = x.shape
        if which == "k" and self.cfg.key_axis == "channel":
            if f"k_lo.{layer}" not in self.state:
                raise RuntimeError("kvquant: per-channel keys need calibration (kvbench.calibration.prepare)")
            lo, hi = (self._state_on(f"k_{e}.{layer}", x)[None, :, None, :] for e in ("lo", "hi"))  # (1, H_kv, 1, D)
            mask = (x < lo) | (x > hi) if self.cfg.outlier_frac > 0 else torch.zeros_like(x, dtype=torch.bool)
            return lo.unsqueeze(-1), hi.unsqueeze(-1), mask  # broadcast over the group axis as (..., D, 1)
        per_token = x.transpose(1, 2).reshape(B, T, H * D)  # outliers chosen per token over all heads
        mask = outlier_mask(per_token, self._outlier_frac(which)).view(B, T, H, D).transpose(1, 2)
        xg = x.view(B, H, T, D // self.group, self.group)
        mg = mask.view_as(xg)
        lo = xg.masked_fill(mg, float("inf")).amin(-1, keepdim=True)  # (B, H_kv, T, D/g, 1)
        hi = xg.masked_fill(mg, float("-inf")).amax(-1, keepdim=True)
        return lo, hi, mask

    def _outlier_frac(self, which: str) -> float:
        return self.cfg.outlier_frac if which == "k" or self.cfg.value_outliers else 0.0

    def _grouped(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """``(B, H, T, D)`` -> ``(B, H, T, D/g, g)`` for per-token ranges, ``(B, H, T, D, 1)`` per channel."""
        if which == "k" and self.cfg.key_axis == "channel":
            return x.unsqueeze(-1)
        return x.unflatten(-1, (x.shape[-1] // self.group, self.group))

    def _normalized(self, x: torch.Tensor, which: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibration data in the quantizer's normalized space: ``(y, dense)`` of ``x``'s shape."""
        lo, hi, mask = self._ranges(x, which, layer)
        y = normalize(self._grouped(x, which), lo, hi).view_as(x)
        return y, ~mask

    def _state_on(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.on_device(name, self.state[name], like.device).to(like.dtype)

    def _codebook(self, which: str, layer: int, like: torch.Tensor) -> torch.Tensor:
        if self.cfg.nuq:
            return self._state_on(f"{which}_cb.{layer}", like)
        w = self.width(which, layer)
        return self.on_device(f"uniform{w}", _uniform_codebook(w), like.device).to(like.dtype)

    def _quantize(self, x: torch.Tensor, which: str, layer: int) -> torch.Tensor:
        if not self.quantizes:
            return x
        from kvbench.kernels import fused_simulated

        if fused_simulated(x, self.group) and isinstance(self.width(which, layer), int):
            return self._fused(x, which, layer)
        xf = x.float()
        lo, hi, mask = self._ranges(xf, which, layer)
        cb = self._codebook(which, layer, xf)
        y = normalize(self._grouped(xf, which), lo, hi).clamp(-1, 1)
        x_hat = denormalize(dequantize_codebook(quantize_codebook(y, cb), cb), lo, hi).view_as(xf)
        x_hat = torch.where(mask, xf, x_hat)  # sparse outliers stay exact
        self.outlier_count[which] = self.outlier_count[which] + mask.sum()  # a tensor: no wait for the device
        self.element_count[which] += mask.numel()
        return x_hat.to(x.dtype)

    def _fused(self, x: torch.Tensor, which: str, layer: int) -> torch.Tensor:
        """:meth:`_quantize` in one Triton launch (CUDA; :mod:`kvbench.kernels.triton.simulated`)."""
        from kvbench.kernels.triton.simulated import fake_quant_tokens

        count = self.outlier_count[which]
        if not torch.is_tensor(count) or count.device != x.device:
            count = self.outlier_count[which] = torch.zeros((), dtype=torch.int64, device=x.device) + count
        cb = self._codebook(which, layer, x.new_empty(0, dtype=torch.float32))  # fp32 on x's device
        if which == "k" and self.cfg.key_axis == "channel":
            lo, hi = (self._state_on(f"k_{e}.{layer}", cb) for e in ("lo", "hi"))
            out = fake_quant_tokens(x, codebook=cb, channel_range=(lo, hi), threshold_outliers=self.cfg.outlier_frac > 0,
                                    outlier_count=count)
        else:
            k = outliers_per_side(x.shape[1] * x.shape[-1], self._outlier_frac(which))
            out = fake_quant_tokens(x, group=self.group, codebook=cb, outliers_per_side=k, outlier_count=count)
        self.element_count[which] += x.numel()
        return out

    def _proxy(self, x: torch.Tensor, which: str, bits: int) -> torch.Tensor:
        """Uniform stand-in of the quantizer for the width allocation (no calibrated state): per-channel
        keys with each calibration window's range, per-token ranges otherwise; no outliers."""
        if which == "k" and self.cfg.key_axis == "channel":
            return fake_quantize_affine(x, bits, dim=-2)
        return fake_quantize_affine(x, bits, dim=-1, group_size=self.group)

    def quantize_keys(self, k, layer, ctx=None):
        """Keys ``(B, H_kv, T, D)`` (pre-RoPE if ``pre_rope``) -> same shape."""
        return self.rotation.around("k", k, lambda y: self._quantize(y, "k", layer))

    def quantize_values(self, v, layer, ctx=None):
        """Values ``(B, H_kv, T, D)`` -> same shape (per-token ranges)."""
        return self.rotation.around("v", v, lambda y: self._quantize(y, "v", layer))

    def packed_spec(self):
        """The packed format of ``kv.backend=kernel``: the simulated numbers, stored.

        Keys: codes of the calibrated per-channel ranges (``scale = (hi - lo) / (2**bits - 1)``,
        ``zero = lo``, one copy per :data:`PACKED_KEY_BLOCK` tokens) with CSR outliers outside
        ``[lo, hi]``, or (``key_axis=token``) per-token ranges per ``kv.group_size`` channels with each
        token's CSR outliers; pre-RoPE if ``pre_rope``. Values: per-token ranges per ``kv.group_size``
        channels, with each token's CSR outliers (``value_outliers``). Both index the layer's codebook
        (uniform, NUQ or Q-Normed), mapped to the code domain.
        """
        from kvbench.cache import PackedCacheSpec
        from kvbench.kernels.ops import codebook_from_unit

        self.check_packable()
        channel = self.cfg.key_axis == "channel"
        if channel and "k_lo.0" not in self.state:
            raise RuntimeError("kvquant: the packed cache needs calibration (kvbench.calibration.prepare)")
        layers = range(self.info.num_layers)
        like = torch.zeros(0)  # fp32, CPU: the cache moves the codebooks to its device
        spec = PackedCacheSpec(
            key_bits=self.bits, value_bits=self.bits, value_group_size=self.group, key_block=PACKED_KEY_BLOCK,
            pre_rope=self.pre_rope,
            key_codebooks=[codebook_from_unit(self._codebook("k", i, like), self.bits) for i in layers],
            value_codebooks=[codebook_from_unit(self._codebook("v", i, like), self.bits) for i in layers],
            value_outlier_frac=self._outlier_frac("v"),
        )
        if not channel:
            return dataclasses.replace(spec, key_axis="token", key_group_size=self.group,
                                       key_outlier_frac=self._outlier_frac("k"))
        ranges = [(self.state[f"k_lo.{i}"], self.state[f"k_hi.{i}"]) for i in layers]  # (H_kv, D) each
        return dataclasses.replace(spec, key_scales=[((hi - lo) / (2**self.bits - 1), lo) for lo, hi in ranges],
                                   key_outlier_thresholds=ranges if self.cfg.outlier_frac > 0 else None)

    def check_packable(self) -> None:
        if self.kv.bits not in (2, 3, 4):
            raise UserError(f"kv.backend=kernel packs 2/3/4-bit codes, got kv.bits={self.kv.bits}")

    # -- bits ----------------------------------------------------------------------------------
    def outlier_rate(self, which: str) -> float:
        """Measured fraction of outliers so far, or the expected one before any quantization."""
        if self.element_count[which]:
            return float(self.outlier_count[which]) / self.element_count[which]
        if which == "k" and self.cfg.key_axis == "channel":
            return self.cfg.outlier_frac
        n = self.info.num_kv_heads * self.info.head_dim  # per-token slices span all heads
        return 2 * outliers_per_side(n, self._outlier_frac(which)) / n

    def _bits(self, which: str, seq_len: int) -> float:
        per_layer_elems = seq_len * self.info.num_kv_heads * self.info.head_dim
        entries = (2 ** self.bits if self.layer_widths is None
                   else float((2.0 ** self.layer_widths[:, 0 if which == "k" else 1].double()).mean()))
        codebook = (entries * FP16_BITS / per_layer_elems) if self.cfg.nuq else 0.0
        if which == "k" and self.cfg.key_axis == "channel":
            scales = SCALE_ZERO_BITS / seq_len  # one (lo, hi) per channel and layer, offline
        else:
            scales = SCALE_ZERO_BITS / self.group  # one (lo, hi) per token, head and group
        return self.mean_width(which) + scales + codebook + OUTLIER_BITS * self.outlier_rate(which)

    def bits_per_element(self, seq_len: int):
        if not self.quantizes:
            return float(FP16_BITS), float(FP16_BITS)
        return self._bits("k", seq_len), self._bits("v", seq_len)
