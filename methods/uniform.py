"""Uniform asymmetric integer quantization of keys and values (the INT-n baselines).

Keys and values each choose their axis: ``token`` (one scale per token and group of
``kv.group_size`` channels, computed online) or ``channel`` (one scale per channel over a block of
``key_block`` tokens, KIVI-style). The KVQuant paper's int-n baseline is per-token for both.
"""

from dataclasses import dataclass

import torch

from kvbench.method import FP16_BITS, Axis, KVMethod, MethodConfig
from kvbench.quant import SCALE_ZERO_BITS, fake_quantize_affine
from kvbench.registry import register

@dataclass
class UniformConfig(MethodConfig):
    name: str = "uniform"
    key_axis: Axis = Axis.token
    value_axis: Axis = Axis.token
    key_block: int = 128


@register("method", "uniform")
class Uniform(KVMethod):
    config_class = UniformConfig

    def __init__(self, cfg, kv, info):
        super().__init__(cfg, kv, info)
        if cfg.key_axis == "token" and cfg.value_axis == "token":
            self.key_block = 1  # per-token statistics need no block of tokens

    def _quantize(self, x: torch.Tensor, axis: str) -> torch.Tensor:
        if axis == "token":  # (B, H_kv, T, D): stats over D, in groups of kv.group_size channels
            return fake_quantize_affine(x, self.kv.bits, dim=-1, group_size=self.kv.group_size)
        return fake_quantize_affine(x, self.kv.bits, dim=-2, group_size=self.key_block)  # per channel, per block

    def quantize_keys(self, k, layer, ctx=None):
        return self._quantize(k, self.cfg.key_axis)

    def quantize_values(self, v, layer, ctx=None):
        return self._quantize(v, self.cfg.value_axis)

    def _bits(self, axis: str) -> float:
        if self.kv.bits >= FP16_BITS:
            return float(FP16_BITS)
        per_group = (self.kv.group_size or self.info.head_dim) if axis == "token" else self.key_block
        return self.kv.bits + SCALE_ZERO_BITS / per_group

    def packed_spec(self):
        """Kernel format: per-channel keys in blocks of ``key_block`` tokens, per-token values."""
        from kvbench.errors import UserError
        from kvbench.cache import PackedCacheSpec

        if (self.cfg.key_axis, self.cfg.value_axis) != ("channel", "token") or self.kv.bits not in (2, 3, 4):
            raise UserError("kv.backend=kernel packs 2/3/4-bit per-channel keys and per-token values: "
                            "set method.key_axis=channel method.value_axis=token")
        return PackedCacheSpec(
            key_bits=self.kv.bits, value_bits=self.kv.bits, key_block=self.key_block,
            value_group_size=self.kv.group_size or self.info.head_dim,
        )

    def bits_per_element(self, seq_len: int):
        return self._bits(self.cfg.key_axis), self._bits(self.cfg.value_axis)
