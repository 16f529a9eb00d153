"""FP16 baseline: the KV cache is left untouched (the model runs unpatched)."""

from dataclasses import dataclass

from kvbench.method import KVMethod, MethodConfig
from kvbench.registry import register


@dataclass
class FP16Config(MethodConfig):
    name: str = "fp16"


@register("method", "fp16")
class FP16(KVMethod):
    config_class = FP16Config

    @property
    def is_identity(self) -> bool:
        return True
