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
import weakref

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvbench.errors import UserError
from kvbench.method import KVContext, KVMethod


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding ``x (B, H, T, D)`` with ``cos, sin (B, T, D)`` (the rotate-half layout)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_rope` (a rotation by the opposite angle)."""
    return x * cos.unsqueeze(1) - rotate_half(x) * sin.unsqueeze(1)


class QuantizingLayer(DynamicLayer):
    """One layer of the quantizing cache.

    ``keys``/``values`` ``(B, H_kv, T, D)`` hold what attention reads: the first ``n_final``
    tokens are final (sink tokens as they are, the rest quantize-dequantized), the tail is still
    in full precision (recent window, or a key block not yet full).
    """

    def __init__(self, method: KVMethod, layer_idx: int):
        super().__init__()
        self.method = method
        self.layer_idx = layer_idx
        self.n_final = 0
        self.cos = self.sin = None  # (B, T, D) rotary tables of the cached tokens
        self.pending_rope = None  # (cos, sin) of the forward in progress, set by a pre-hook
        self.query = None  # (B, H_q, T_q, D) post-RoPE queries of the forward in progress
        self.n_quantized = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.method.pre_rope and self.pending_rope is not None:
            cos, sin = self.pending_rope
            self.cos = cos if self.cos is None else torch.cat([self.cos, cos], dim=-2)
            self.sin = sin if self.sin is None else torch.cat([self.sin, sin], dim=-2)
        self.pending_rope = None
        self._finalize(query_start=self.keys.shape[-2] - key_states.shape[-2])
        self.query = None
        return self.keys, self.values

    def _finalize(self, query_start: int) -> None:
        m, cfg = self.method, self.method.cfg
        total = self.keys.shape[-2]
        lo = max(self.n_final, min(cfg.sink_tokens, total))
        n = max(0, total - cfg.recent_window - lo) // m.key_block * m.key_block
        if n == 0:
            self.n_final = lo
            return
        hi = lo + n
        ctx = KVContext(start=lo, query=self.query, query_start=query_start, keys=self.keys)
        k = self.keys[..., lo:hi, :]  # (B, H_kv, n, D)
        rope = m.pre_rope and self.cos is not None
        if rope:
            cos, sin = self.cos[:, lo:hi], self.sin[:, lo:hi]
            k = invert_rope(k, cos, sin)
        k_hat, v_hat = m.quantize_kv(k, self.values[..., lo:hi, :], self.layer_idx, ctx)
        if rope:
            k_hat = apply_rope(k_hat, cos, sin)
        self.keys = torch.cat([self.keys[..., :lo, :], k_hat.to(k.dtype), self.keys[..., hi:, :]], dim=-2)
        self.values = torch.cat([self.values[..., :lo, :], v_hat.to(k.dtype), self.values[..., hi:, :]], dim=-2)
        self.n_final = hi
        self.n_quantized += n


class QuantizingCache(Cache):
    """A transformers ``Cache`` whose layers pass K/V through a method (simulated quantization)."""

    def __init__(self, method: KVMethod, num_layers: int):
        super().__init__(layers=[QuantizingLayer(method, i) for i in range(num_layers)])
        self.method = method


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder (OPT, Llama, Mistral, Qwen2, Gemma3, ...), in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj") and hasattr(m, "layer_idx")]
    if not mods:
        raise UserError(f"no attention layers with k_proj/v_proj/layer_idx found in {type(model).__name__}")
    return sorted(mods, key=lambda m: m.layer_idx)


def cache_factory(model, method: KVMethod, backend: str, n_layers: int, kernel=None):
    """A function that builds an empty cache of the backend's kind for one forward / generation.

    ``kernel`` is the ``kv.kernel`` config (``impl``, ``path``) of ``backend="kernel"``; by default the
    method's own ``kv.kernel``."""
    if backend == "simulated":
        return lambda: QuantizingCache(method, n_layers)
    if backend != "kernel":
        raise UserError(f"kv.backend must be simulated or kernel, got {backend!r}")
    from kvbench.kernels.cache import enable_fused_decode, make_packed_cache
    from kvbench.kernels.ops import BACKEND_ERROR, IMPLS, resolve_impl, triton_available

    kernel = kernel if kernel is not None else getattr(method.kv, "kernel", None)
    impl, path = (kernel.impl, kernel.path) if kernel is not None else ("auto", "auto")
    if impl not in IMPLS:
        raise UserError(f"kv.kernel.impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    impl = resolve_impl(impl, next(model.parameters()).device)
    if impl == "triton" and not triton_available():
        raise UserError(BACKEND_ERROR + "; or set kv.kernel.impl=reference")
    if impl == "triton" and path != "auto":
        from kvbench.kernels.triton import PATHS

        if path not in PATHS:
            raise UserError(f"kv.kernel.path must be auto or one of {', '.join(PATHS)}, got {path!r}")
    spec = dataclasses.replace(method.packed_spec(), impl=impl, path=path)
    enable_fused_decode(model)
    return lambda: make_packed_cache(model.config, spec)


@dataclasses.dataclass
class Patch:
    """What :func:`patched` yields: the caches it hands the model, for the caller to inspect.

    Attributes:
        last_cache: the cache built for the latest forward or generation (``None`` before the first,
            and always for identity methods); the packed cache measures its real memory.
    """

    last_cache: Cache | None = None


@contextlib.contextmanager
def patched(model, method: KVMethod, backend: str = "simulated", kernel=None):
    """Route the model's KV cache through ``method`` while the context is open.

    ``backend="simulated"`` quantize-dequantizes in PyTorch (:class:`QuantizingCache`);
    ``backend="kernel"`` stores K/V packed and decodes with the Triton kernels
    (:mod:`kvbench.kernels`; ``kernel`` is the ``kv.kernel`` config). Identity methods (fp16) install
    nothing, so the model is bit-for-bit the unpatched one. Yields a :class:`Patch`, whose
    ``last_cache`` is the cache of the latest forward (its real memory can be measured).
    """
    patch = Patch()
    if method.is_identity:
        yield patch
        return
    attn = attention_modules(model)
    prev_impl = model.config._attn_implementation
    make = cache_factory(model, method, backend, len(attn), kernel)
    ours = weakref.WeakSet()  # the caches this patch built: generate() hands them back every step
    current: dict[int, QuantizingLayer | None] = {}  # layer index -> its cache layer in this forward
    handles = []

    def inject_cache(module, args, kwargs):
        pkv = kwargs.get("past_key_values")
        if pkv is not None and pkv in ours:
            return None
        if pkv is not None and pkv.get_seq_length() > 0:
            raise RuntimeError("kvbench: a non-empty cache of another type was passed to a patched model")
        patch.last_cache = cache = make()
        ours.add(cache)
        kwargs["past_key_values"] = cache
        kwargs["use_cache"] = True
        return args, kwargs

    def record_rope(module, args, kwargs):
        pkv = kwargs.get("past_key_values")
        layer = pkv.layers[module.layer_idx] if isinstance(pkv, QuantizingCache) else None
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
