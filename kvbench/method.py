"""The interface every method plugin implements, and the components all methods share.

A method sees the K/V of one attention layer as tensors of shape ``(B, H_kv, T, D)`` and returns
their quantize-dequantized version of the same shape (simulated quantization). The cache in
:mod:`kvbench.cache` decides *which* tokens reach the method: the first ``sink_tokens`` tokens
(attention sinks, KVQuant) and the ``recent_window`` most recent tokens (KIVI's fp16 residual) are
kept in full precision by that shared component, for every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Optional

import torch
from omegaconf import MISSING

from kvbench.methods.components.layer_bits import LayerBits, allocate, candidate_widths, unit_errors
from kvbench.methods.components.rotation import KVRotation, Rotate, Rotation

if TYPE_CHECKING:
    from kvbench.config import KVConfig
    from kvbench.model import ModelInfo

FP16_BITS = 16


class Axis(StrEnum):
    """What one scale / zero point (or code range) covers: a token's channels, or a channel's tokens."""

    token = "token"
    channel = "channel"


@dataclass
class MethodConfig:
    """Fields shared by every method. Subclasses add their own hyperparameters.

    Attributes:
        name: registry name of the method.
        sink_tokens: first tokens of every sequence kept in fp16 (attention sinks).
        recent_window: most recent tokens kept in fp16 before being quantized (KIVI's residual).
        key_block: tokens whose keys are quantized together. Methods with per-channel online key
            statistics need a block of tokens before they can quantize; per-token methods use 1.
        rotation: ``hadamard``: a randomized Hadamard transform over head_dim before quantization,
            undone after dequantization (:mod:`kvbench.methods.components.rotation`).
        rotate: what is rotated: ``keys``, ``values`` or ``both``.
        rotation_seed: seed of the rotation's random signs.
        layer_bits: ``layer`` / ``head``: a code width per layer and K/V (and KV head), chosen at
            calibration under ``bit_budget`` (:mod:`kvbench.methods.components.layer_bits`).
        bit_budget: average code width of the allocation (``None``: ``kv.bits``).
        layer_bit_choices: the widths a unit may get (``None``: ``kv.bits - 1 .. kv.bits + 1``).
    """

    name: str = MISSING
    sink_tokens: int = 0
    recent_window: int = 0
    key_block: int = 1
    rotation: Rotation = Rotation.none
    rotate: Rotate = Rotate.both
    rotation_seed: int = 0
    layer_bits: LayerBits = LayerBits.none
    bit_budget: Optional[float] = None
    layer_bit_choices: Optional[list[int]] = None


class KVMethod:
    """Base class of method plugins (at most this one intermediate class).

    Subclasses override :meth:`quantize_keys`, :meth:`quantize_values` and :meth:`bits_per_element`,
    and, if they learn something offline, :meth:`calibration_needs` / :meth:`calibrate` /
    :meth:`load_state`.

    Args:
        cfg: the method's config dataclass (or a DictConfig with the same fields).
        kv: the shared ``kv`` config (bits, group size, backend).
        info: shapes of the model (layers, heads, head_dim).
    """

    config_class = MethodConfig
    name = "base"
    version = 1  # bump when a change invalidates calibration artifacts
    pre_rope = False  # True: quantize_keys receives keys before the rotary embedding
    needs_query = False  # True: the cache stores the layer's post-RoPE queries in ``ctx.query``
    per_head_bits = False  # True: the quantizer takes a width per KV head (method.layer_bits=head)

    def __init__(self, cfg, kv: "KVConfig", info: "ModelInfo"):
        from kvbench.errors import UserError

        self.cfg = cfg
        self.kv = kv
        self.info = info
        self.key_block = cfg.key_block
        self.rotation = KVRotation(cfg.rotation, cfg.rotate, cfg.rotation_seed, info.head_dim)
        self.layer_widths: Optional[torch.Tensor] = None  # (L, 2) or (L, 2, H_kv) int64: K, V widths, calibrated
        self._device_copies: dict = {}  # (name, device) -> (host tensor, its fp32 copy there): see on_device
        if cfg.layer_bits != LayerBits.none:
            if cfg.layer_bits == LayerBits.head and not self.per_head_bits:
                raise UserError(f"method {cfg.name} has one code width per layer: set method.layer_bits=layer")
            self.bit_widths = candidate_widths(kv.bits, cfg.layer_bit_choices)
        if getattr(kv, "backend", "simulated") == "kernel" and (cfg.rotation != Rotation.none or cfg.layer_bits != LayerBits.none):
            raise UserError("kv.backend=kernel packs one width and no rotation: set method.rotation=none method.layer_bits=none")

    # -- what subclasses override -----------------------------------------------------------
    def quantize_keys(self, k: torch.Tensor, layer: int, ctx: "Optional[KVContext]" = None) -> torch.Tensor:
        """Simulated quantization of keys ``(B, H_kv, T, D) -> (B, H_kv, T, D)``."""
        return k

    def quantize_values(self, v: torch.Tensor, layer: int, ctx: "Optional[KVContext]" = None) -> torch.Tensor:
        """Simulated quantization of values ``(B, H_kv, T, D) -> (B, H_kv, T, D)``."""
        return v

    def quantize_kv(self, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: "Optional[KVContext]" = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Simulated quantization of one chunk of keys and values ``(B, H_kv, T, D)``, both at once.

        The cache calls this; the default quantizes keys and values independently. A method whose
        keys and values share a decision about the chunk (QoKV's token groups) overrides it, so the
        decision travels as a local value instead of being remembered between two calls.
        """
        return self.quantize_keys(k, layer, ctx), self.quantize_values(v, layer, ctx)

    def bits_per_element(self, seq_len: int) -> tuple[float, float]:
        """Average stored bits per key and per value element of a *quantized* token, scales, zero
        points and outliers included, and what is stored once per layer (calibrated ranges, codebooks)
        amortised over a ``seq_len``-token sequence."""
        return float(FP16_BITS), float(FP16_BITS)

    def calibration_needs(self) -> frozenset[str]:
        """What calibration must collect: subset of ``{"keys", "values", "fisher", "attention"}``."""
        return frozenset()

    def calibrate(self, stats: dict, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
        """Learn state from calibration statistics (host tensors); returns the tensors to store as an artifact
        (host). ``device``: where a method may run its fitting, a layer at a time (the model's device)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`calibrate` returned (read back from the artifact store)."""

    def state_shapes(self) -> Optional[dict[str, tuple]]:
        """The tensors :meth:`calibrate` returns for this configuration, ``{name: shape}`` (``None``
        in a shape: any size). A stored artifact is refused unless its tensors match exactly.
        ``None`` (the default): not declared, only the artifact's own record is checked."""
        return None

    def packed_spec(self):
        """The :class:`kvbench.cache.packed.PackedCacheSpec` of this configuration (``kv.backend=kernel``)."""
        from kvbench.errors import UserError

        raise UserError(f"method {self.name} has no packed (kernel) format yet; use kv.backend=simulated")

    def check_packable(self) -> None:
        """Refuse, in one line naming the component and why, a configuration :meth:`packed_spec` cannot store
        (``kv.backend=kernel``); run by validation before any weights load. Default: no packed format."""
        if type(self).packed_spec is KVMethod.packed_spec:
            self.packed_spec()

    @property
    def is_identity(self) -> bool:
        """True when the method leaves K/V untouched (the patch then installs nothing)."""
        return False

    # -- shared components: per-layer widths -----------------------------------------------
    @property
    def allocates_bits(self) -> bool:
        """True when ``method.layer_bits`` chooses the widths at calibration."""
        return self.cfg.layer_bits != LayerBits.none and self.kv.bits < FP16_BITS

    def layer_bits_needs(self) -> frozenset[str]:
        """Calibration statistics the width allocation reads (keys as the method quantizes them)."""
        if not self.allocates_bits:
            return frozenset()
        return frozenset({"keys" if self.pre_rope else "keys_post", "values", "fisher"})

    def fit_layer_bits(self, stats: dict, proxy) -> dict[str, torch.Tensor]:
        """Allocate widths from (rotated) calibration statistics; ``proxy(x, which, bits)`` is the
        method's quantizer without calibrated state. Returns ``{"layer_bits": (L, 2[, H_kv])}`` (or
        ``{}``) and keeps it on the method."""
        if not self.allocates_bits:
            return {}
        name = "keys" if self.pre_rope else "keys_post"  # sink tokens already left out (calibration.without_sink)
        per_head = self.cfg.layer_bits == LayerBits.head
        errs = []
        for which, xname in (("k", name), ("v", "values")):
            xs, fish = stats[xname], stats.get(f"fisher_{xname}")
            errs.append(unit_errors(xs, fish, self.bit_widths, lambda x, b, w=which: proxy(x, w, b), per_head))
        budget = self.kv.bits if self.cfg.bit_budget is None else self.cfg.bit_budget
        self.layer_widths = allocate(torch.stack(errs, 1), self.bit_widths, budget)  # (L, 2[, H_kv])
        return {"layer_bits": self.layer_widths}

    def layer_bits_shapes(self) -> dict:
        if not self.allocates_bits:
            return {}
        L, H = self.info.num_layers, self.info.num_kv_heads
        return {"layer_bits": (L, 2, H) if self.cfg.layer_bits == LayerBits.head else (L, 2)}

    def width(self, which: str, layer: int):
        """Code width of ``which`` (``"k"``/``"v"``) in ``layer``: ``kv.bits``, the layer's calibrated
        width (int), or ``(H_kv,)`` widths per KV head."""
        if not self.allocates_bits:
            return self.kv.bits
        if self.layer_widths is None:
            raise RuntimeError(f"{self.name}: method.layer_bits needs calibration (kvbench.calibration.prepare)")
        w = self.layer_widths[layer, 0 if which == "k" else 1]
        return int(w) if w.dim() == 0 else w

    def mean_width(self, which: str) -> float:
        """Average code width of ``which`` over all layers (and heads)."""
        if not self.allocates_bits or self.layer_widths is None:
            return float(self.kv.bits) if self.kv.bits < FP16_BITS else float(FP16_BITS)
        return float(self.layer_widths[:, 0 if which == "k" else 1].double().mean())

    def on_device(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor`` (calibrated state, a codebook) as fp32 on ``device``, copied once: a host-to-device copy
        in every layer of every forward makes the host wait for the GPU each time."""
        key = (name, device)
        host, copy = self._device_copies.get(key, (None, None))
        if host is not tensor:
            copy = tensor.to(device, torch.float32)
            self._device_copies[key] = (tensor, copy)
        return copy

    # -- shared, final ----------------------------------------------------------------------
    def avg_bits(self, seq_len: int) -> float:
        """Average bits per stored K/V element of a ``seq_len``-token sequence, sink and
        recent-window tokens counted at 16 bits."""
        kb, vb = self.bits_per_element(seq_len)
        protected = min(seq_len, self.cfg.sink_tokens + self.cfg.recent_window)
        quantized = seq_len - protected
        return (protected * FP16_BITS + quantized * (kb + vb) / 2) / seq_len


@dataclass
class KVContext:
    """What the cache knows about the tokens handed to a method.

    Attributes:
        start: absolute position of the first token of the chunk.
        query: post-RoPE queries of the current forward ``(B, H_q, T_q, D)`` (only if the method
            sets ``needs_query``), with ``query_start`` their absolute first position.
        keys: all keys of the layer so far, unquantized where still available ``(B, H_kv, T, D)``.
    """

    start: int
    query: Optional[torch.Tensor] = None
    query_start: int = 0
    keys: Optional[torch.Tensor] = None
