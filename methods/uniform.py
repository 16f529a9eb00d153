"""Uniform asymmetric integer quantization of keys and values (the INT-n baselines).

Keys and values each choose their axis: ``token`` (one scale per token and group of
``kv.group_size`` channels -- ``value_group_size`` for values -- computed online) or ``channel`` (one
scale per channel over a block of ``key_block`` tokens, KIVI-style). The KVQuant paper's int-n
baseline is per-token for both. The shared components apply: rotation (``method.rotation``) and
per-layer / per-KV-head widths (``method.layer_bits``, calibrated from the Fisher information).
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from kvbench.method import FP16_BITS, Axis, KVMethod, MethodConfig
from kvbench.quant import SCALE_ZERO_BITS, fake_quantize_affine
from kvbench.registry import register

@dataclass
class UniformConfig(MethodConfig):
    """Attributes:
        key_axis: ``token`` or ``channel`` ranges for keys.
        value_axis: the same for values.
        value_group_size: channels per value range on the ``token`` axis (``None``: ``kv.group_size``).
    """

    name: str = "uniform"
    key_axis: Axis = Axis.token
    value_axis: Axis = Axis.token
    key_block: int = 128
    value_group_size: Optional[int] = None


@register("method", "uniform")
class Uniform(KVMethod):
    config_class = UniformConfig
    per_head_bits = True

    def __init__(self, cfg, kv, info):
        super().__init__(cfg, kv, info)
        if cfg.key_axis == "token" and cfg.value_axis == "token":
            self.key_block = 1  # per-token statistics need no block of tokens

    def _group(self, which: str) -> Optional[int]:
        """Channels per range on the token axis."""
        return (self.cfg.value_group_size or self.kv.group_size) if which == "v" else self.kv.group_size

    def _quantize(self, x: torch.Tensor, which: str, bits) -> torch.Tensor:
        """``x (B, H_kv, T, D)`` at ``bits`` (an int, or ``(H_kv,)`` widths per KV head)."""
        if isinstance(bits, torch.Tensor):
            out = torch.empty_like(x)
            for b in bits.unique().tolist():
                heads = (bits == b).nonzero().flatten().tolist()
                out[:, heads] = self._quantize(x[:, heads], which, int(b))
            return out
        axis = self.cfg.key_axis if which == "k" else self.cfg.value_axis
        if axis == "token":  # (B, H_kv, T, D): stats over D, in groups of channels
            return fake_quantize_affine(x, bits, dim=-1, group_size=self._group(which))
        return fake_quantize_affine(x, bits, dim=-2, group_size=self.key_block)  # per channel, per block

    def _proxy(self, x: torch.Tensor, which: str, bits: int) -> torch.Tensor:
        """The quantizer on calibration windows ``(N, H_kv, T, D)`` (a partial last key block stays exact)."""
        axis = self.cfg.key_axis if which == "k" else self.cfg.value_axis
        n = x.shape[-2] // self.key_block * self.key_block if axis == "channel" else x.shape[-2]
        return torch.cat([self._quantize(x[..., :n, :], which, bits), x[..., n:, :]], dim=-2)

    def quantize_keys(self, k, layer, ctx=None):
        return self.rotation.around("k", k, lambda y: self._quantize(y, "k", self.width("k", layer)))

    def quantize_values(self, v, layer, ctx=None):
        return self.rotation.around("v", v, lambda y: self._quantize(y, "v", self.width("v", layer)))

    # -- calibration: only for per-layer widths ---------------------------------------------------
    def calibration_needs(self):
        return self.layer_bits_needs()

    def calibrate(self, stats, device=None):
        """Widths per layer (and head) from the rotated statistics: ``{"layer_bits": (L, 2[, H_kv])}``."""
        return self.fit_layer_bits(self.rotation.statistics(stats), self._proxy)

    def load_state(self, tensors):
        self.layer_widths = tensors.get("layer_bits")

    def state_shapes(self):
        return self.layer_bits_shapes()

    def _bits(self, which: str) -> float:
        if self.kv.bits >= FP16_BITS:
            return float(FP16_BITS)
        axis = self.cfg.key_axis if which == "k" else self.cfg.value_axis
        per_group = (self._group(which) or self.info.head_dim) if axis == "token" else self.key_block
        return self.mean_width(which) + SCALE_ZERO_BITS / per_group

    def packed_spec(self):
        """Kernel format: keys per channel in blocks of ``key_block`` tokens, or per token in groups of
        ``kv.group_size`` channels; values per token."""
        from kvbench.cache import PackedCacheSpec

        self.check_packable()
        spec = PackedCacheSpec(key_bits=self.kv.bits, value_bits=self.kv.bits,
                               value_group_size=self._group("v") or self.info.head_dim)
        if self.cfg.key_axis == "channel":
            return dataclasses.replace(spec, key_block=self.key_block)
        return dataclasses.replace(spec, key_axis="token", key_group_size=self._group("k") or self.info.head_dim)

    def check_packable(self) -> None:
        from kvbench.errors import UserError

        if self.cfg.value_axis != "token":
            raise UserError("kv.backend=kernel reads values with one range per token (the decode kernel scales each "
                            "value row as it loads it): set method.value_axis=token")

    def bits_per_element(self, seq_len: int):
        return self._bits("k"), self._bits("v")
