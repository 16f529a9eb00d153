"""KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
arXiv 2402.02750) as a named preset of :mod:`uniform <kvbench.methods.uniform>`.

KIVI's configuration: keys per channel, their ranges over blocks of 32 tokens (the paper's group
size G = 32); values per token, in groups of 32 channels; the most recent 128 tokens (the residual
length R = 128) in fp16. ``method=kivi`` is one override; every field stays overridable
(``method.recent_window=32``) and every shared component composes with it (``method.rotation=hadamard``).
The value group is a field of the preset (``value_group_size``), so ``kv.group_size`` stays the
shared default of the other methods.
"""

from dataclasses import dataclass
from typing import Optional

from kvbench.method import Axis
from kvbench.methods.uniform import Uniform, UniformConfig
from kvbench.registry import register


@dataclass
class KIVIConfig(UniformConfig):
    name: str = "kivi"
    key_axis: Axis = Axis.channel
    value_axis: Axis = Axis.token
    key_block: int = 32
    value_group_size: Optional[int] = 32
    recent_window: int = 128


@register("method", "kivi")
class KIVI(Uniform):
    config_class = KIVIConfig
