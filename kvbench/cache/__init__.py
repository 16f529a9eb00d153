"""KV caches: the hooks that hand a model kvbench's cache (:mod:`.hooks`), the simulated backend
(:mod:`.simulated`) and the packed backend over the kernels (:mod:`.packed`)."""

from kvbench.cache.hooks import Patch, cache_factory, patched
from kvbench.cache.packed import (
    PACKED_ATTN,
    PackedCache,
    PackedCacheSpec,
    PackedLayer,
    enable_fused_decode,
    make_packed_cache,
    packed_attention_forward,
    register_packed_attention,
)
from kvbench.cache.simulated import QuantizingCache, QuantizingLayer

__all__ = ["PACKED_ATTN", "PackedCache", "PackedCacheSpec", "PackedLayer", "Patch", "QuantizingCache", "QuantizingLayer",
           "cache_factory", "enable_fused_decode", "make_packed_cache", "packed_attention_forward", "patched",
           "register_packed_attention"]
