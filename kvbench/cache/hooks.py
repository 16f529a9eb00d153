"""KV-cache interception: every K/V of every attention layer passes through the method.

One mechanism serves both uses of a model:

* scoring a full sequence (perplexity, lm-eval log-likelihoods): the model's forward is handed a
  :class:`QuantizingCache`, so the attention of every token reads the quantized K/V of the earlier
  tokens, exactly as if they were read back from a quantized cache;
* ``generate()``: the same cache quantizes tokens as they are appended.

A forward pre-hook on the model injects the cache whenever the caller gave none (or an empty one,
as ``generate()`` and lm-eval do), so no caller has to know about kvbench. Keys can be quantized
**before RoPE**: an attention pre-hook records the rotary tables of the current forward, and the
cache rotates keys back (``k_pre = k cos - rot(k) sin``), quantizes, and rotates again.

Token protection (a shared component of every method): the first ``sink_tokens`` tokens and the
``recent_window`` most recent tokens stay in full precision; tokens leave the recent window in
blocks of ``method.key_block`` tokens (1 for per-token methods).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
import weakref

from transformers.cache_utils import Cache

from kvbench.cache.packed import PackedCache
from kvbench.cache.simulated import QuantizingCache, QuantizingLayer
from kvbench.method import KVMethod
from kvbench.model.anatomy import apply_rope, attention_modules
from kvbench.registry import get


def cache_factory(model, method: KVMethod, backend: str, n_layers: int, kernel=None, prefill: str = "quantized"):
    """A function that builds an empty cache of ``backend`` (a registered ``cache backend``) for one
    forward or generation. ``kernel`` is the ``kv.kernel`` config (default: the method's ``kv.kernel``);
    ``prefill`` is ``kv.prefill`` (``quantized`` | ``full``)."""
    return get("cache backend", str(backend))(model, method, n_layers, kernel, str(prefill))


def padding_spans(mask) -> list[tuple[int, int]] | None:
    """The real tokens ``[(start, end)]`` of each row of a padded batch, from a ``(B, T)`` attention mask
    (1 = token, 0 = padding, left or right); ``None`` without padding (or without a 2-D mask), and ``None``
    with a warning where a row has zeros inside it (``generate()`` masks every ``pad_token_id`` it finds in
    the prompt): such a batch is cached as one block, as an unpadded batch is."""
    if mask is None or mask.dim() != 2 or bool(mask.bool().all()):
        return None
    spans = []
    for row in mask.bool():
        idx = row.nonzero().flatten()
        s, e = (int(idx[0]), int(idx[-1]) + 1) if idx.numel() else (0, 0)
        if not bool(row[s:e].all()):
            warnings.warn("kvbench: the attention mask has zeros inside a sequence (a pad_token_id in the prompt?); "
                          "the batch is cached as given, not row by row", stacklevel=2)
            return None
        spans.append((s, e))
    return spans


@dataclasses.dataclass
class Patch:
    """What :func:`patched` yields: the caches it hands the model, for the caller to inspect.

    Attributes:
        last_cache: the cache built for the latest forward or generation (``None`` before the first,
            and always for identity methods); the packed cache measures its real memory.
    """

    last_cache: Cache | None = None


@contextlib.contextmanager
def patched(model, method: KVMethod, backend: str = "simulated", kernel=None, prefill: str = "quantized"):
    """Route the model's KV cache through ``method`` while the context is open.

    ``backend="simulated"`` quantize-dequantizes in PyTorch (:class:`QuantizingCache`);
    ``backend="kernel"`` stores K/V packed and decodes with the Triton kernels
    (:mod:`kvbench.kernels`; ``kernel`` is the ``kv.kernel`` config). Identity methods (fp16) install
    nothing, so the model is bit-for-bit the unpatched one. Yields a :class:`Patch`, whose
    ``last_cache`` is the cache of the latest forward (its real memory can be measured).

    ``prefill`` (``kv.prefill``): ``quantized``: the first forward a cache sees (a scoring forward,
    or the prompt of ``generate()``) attends to the quantized K/V of the earlier tokens; ``full``: that
    forward attends to its full-precision K/V and leaves them quantized in the cache, so only later
    forwards (decode steps) read quantized K/V.
    """
    patch = Patch()
    if method.is_identity:
        yield patch
        return
    attn = attention_modules(model)
    prev_impl = model.config._attn_implementation
    make = cache_factory(model, method, backend, len(attn), kernel, prefill)
    ours = weakref.WeakSet()  # the caches this patch built: generate() hands them back every step
    current: dict[int, QuantizingLayer | None] = {}  # layer index -> its cache layer in this forward
    handles = []

    def inject_cache(module, args, kwargs):
        pkv = kwargs.get("past_key_values")
        if pkv is not None and pkv in ours:
            return None
        if pkv is not None and pkv.get_seq_length() > 0:
            raise RuntimeError("kvbench: a non-empty cache of another type was passed to a patched model")
        patch.last_cache = cache = make(padding_spans(kwargs.get("attention_mask")))
        ours.add(cache)
        kwargs["past_key_values"] = cache
        kwargs["use_cache"] = True
        return args, kwargs

    def record_rope(module, args, kwargs):
        pkv = kwargs.get("past_key_values")
        layer = pkv.layers[module.layer_idx] if isinstance(pkv, (QuantizingCache, PackedCache)) else None
        current[module.layer_idx] = layer
        if layer is not None:
            layer.pending_rope = kwargs.get("position_embeddings")

    def record_query(parent, module, args, out):
        layer = current.get(parent.layer_idx)
        if layer is None:
            return
        B, T = out.shape[0], out.shape[1]
        q = out.view(B, T, -1, parent.head_dim).transpose(1, 2)  # (B, H_q, T, D)
        if layer.pending_rope is not None:
            q = apply_rope(q, *layer.pending_rope)
        layer.query = q

    handles.append(model.register_forward_pre_hook(inject_cache, with_kwargs=True))
    for mod in attn:
        handles.append(mod.register_forward_pre_hook(record_rope, with_kwargs=True))
        if method.needs_query:
            q_mod = getattr(mod, "q_norm", None) or mod.q_proj
            handles.append(q_mod.register_forward_hook(functools.partial(record_query, mod)))
    try:
        yield patch
    finally:
        if model.config._attn_implementation != prev_impl:
            model.set_attn_implementation(prev_impl)
        for h in handles:
            h.remove()
