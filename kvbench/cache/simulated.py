"""The simulated backend: a transformers ``Cache`` whose layers quantize-dequantize K/V in PyTorch.

Every token attends to the quantized K/V of the earlier tokens, as if read back from a quantized cache.
Token protection (a shared component of every method): the first ``sink_tokens`` tokens and the
``recent_window`` most recent tokens stay in full precision; tokens leave the recent window in blocks of
``method.key_block`` tokens (1 for per-token methods).

A padded batch (``spans``: the real tokens of each row in the first forward) is cached row by row, each
row over its own tokens only, so padding enters no block statistics, recent window, sink or token group
and a row's K/V are quantized as at batch size 1.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvbench.method import KVContext, KVMethod
from kvbench.model.anatomy import apply_rope, invert_rope
from kvbench.registry import register


class QuantizingLayer(DynamicLayer):
    """One layer of the quantizing cache.

    ``keys``/``values`` ``(B, H_kv, T, D)`` hold what attention reads: the first ``n_final``
    tokens are final (sink tokens as they are, the rest quantize-dequantized), the tail is still
    in full precision (recent window, or a key block not yet full). With ``full_prefill`` the first
    update (the prefill) returns its K/V unquantized to attention and stores them quantized.
    """

    def __init__(self, method: KVMethod, layer_idx: int, full_prefill: bool = False, spans=None):
        super().__init__()
        self.method = method
        self.layer_idx = layer_idx
        self.full_prefill = full_prefill
        self.spans = spans  # [(start, end)] of each row's real tokens in the first forward; None: no padding
        self.rows = None if spans is None else [QuantizingLayer(method, layer_idx, full_prefill) for _ in spans]
        self.n_final = 0
        self.cos = self.sin = None  # (B, T, D) rotary tables of the cached tokens
        self.pending_rope = None  # (cos, sin) of the forward in progress, set by a pre-hook
        self.query = None  # (B, H_q, T_q, D) post-RoPE queries of the forward in progress
        self.n_quantized = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if self.rows is not None:
            return self._update_rows(key_states, value_states)
        prefill = not self.is_initialized
        if prefill:
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
        if prefill and self.full_prefill:  # kv.prefill=full: the prompt attends in full precision
            return key_states, value_states
        return self.keys, self.values

    def _update_rows(self, key_states, value_states):
        """A padded batch ``(B, H_kv, T, D)``: each row's real tokens go to its own one-row layer; padding
        is kept as it came (attention masks it). Returns the rows reassembled at their positions."""
        prefill = not self.is_initialized
        if prefill:
            self.lazy_initialization(key_states, value_states)
            self.n_prompt = key_states.shape[-2]
        elif any(e < self.n_prompt for _, e in self.spans):
            raise NotImplementedError("kvbench: a right-padded batch cannot be extended (generate() pads on the left)")
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = self.keys.clone(), self.values.clone()
        for b, (row, (s, e)) in enumerate(zip(self.rows, self.spans)):
            new = slice(s, e) if prefill else slice(None)
            if self.pending_rope is not None:  # (B or 1, T, D) rotary tables
                row.pending_rope = tuple(t[b if t.shape[0] > 1 else 0][None, new] for t in self.pending_rope)
            if self.query is not None:
                row.query = self.query[b : b + 1, :, new]
            k, v = row.update(key_states[b : b + 1, :, new], value_states[b : b + 1, :, new])  # (1, H_kv, n_b, D)
            keys[b, :, s : s + k.shape[-2]], values[b, :, s : s + k.shape[-2]] = k[0], v[0]
        self.pending_rope = self.query = None
        self.n_quantized = sum(row.n_quantized for row in self.rows)
        return keys, values

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

    def __init__(self, method: KVMethod, num_layers: int, prefill: str = "quantized", spans=None):
        super().__init__(layers=[QuantizingLayer(method, i, prefill == "full", spans) for i in range(num_layers)])
        self.method = method


@register("cache backend", "simulated")
def simulated_cache(model, method: KVMethod, n_layers: int, kernel=None, prefill: str = "quantized"):
    """``kv.backend=simulated``: a fresh :class:`QuantizingCache` per forward / generation; ``spans``:
    the real tokens ``[(start, end)]`` of each row of a padded batch (see :func:`kvbench.cache.hooks.padding_spans`)."""
    return lambda spans=None: QuantizingCache(method, n_layers, prefill, spans)
