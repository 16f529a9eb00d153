"""Models: loading (hub / local / embedded GGUF / tiny test model) and the anatomy kvbench needs."""

from kvbench.model.anatomy import apply_rope, attention_modules, invert_rope, rope_tables, rotate_half
from kvbench.model.loading import (
    DTYPES,
    EMBEDDED_MODELS,
    TINY_MODELS,
    EmbeddedModel,
    build_random_model,
    byte_tokenizer,
    resolve_dtype,
    ModelInfo,
    embedded_model_path,
    hub_reachable,
    info_from_config,
    load_model,
    load_tokenizer,
    model_config,
    model_fingerprint,
    model_fingerprint_of,
    model_info,
    model_source,
)

__all__ = ["DTYPES", "EMBEDDED_MODELS", "TINY_MODELS", "EmbeddedModel", "ModelInfo", "apply_rope", "attention_modules",
           "build_random_model", "byte_tokenizer", "resolve_dtype",
           "embedded_model_path", "hub_reachable", "info_from_config", "invert_rope", "load_model", "load_tokenizer",
           "model_config", "model_fingerprint", "model_fingerprint_of", "model_info", "model_source", "rope_tables", "rotate_half"]
