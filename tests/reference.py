"""Independent references for the golden tests: hand-written quantizers and HF's own loss, no kvbench code.

kvbench routes K/V through its own cache (:mod:`kvbench.cache`); the references here instead hook
transformers' Llama attention directly: keys by wrapping ``apply_rotary_pos_emb`` of ``modeling_llama``
(rotated back by hand for pre-RoPE quantization), values at the ``v_proj`` output, and the loss is
HF's ``model(ids, labels=ids).loss``. Per-token quantized perplexity is chaotic: a 1e-7 change of
one key flips a rounding and moves int3 perplexity by ~1 %, so a tight reference must follow the same
arithmetic as the method (same formula, same RoPE round trip), written independently. Comparing the two on the same machine checks
kvbench's plumbing (cache, RoPE inversion, sink tokens, windows, loss) without cross-machine drift.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import transformers.models.llama.modeling_llama as llama

DRIFT = Path(__file__).parents[1] / "benchmarks" / "results" / "cpu_drift.json"
DRIFT_FLOOR = 1e-5  # relative: rows that did not move at any measured level still get float noise room


def minmax(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token asymmetric min-max quantize-dequantize over the last axis ``(..., D)``."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    return torch.round((x - lo) / scale).clamp(0, 2**bits - 1) * scale + lo


def nearest(y: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The nearest entry of a sorted ``codebook (K,)`` to every element of ``y``, decided against the
    midpoints of neighbouring entries (a value on a midpoint takes the lower entry)."""
    mid = (codebook[1:] + codebook[:-1]) / 2
    return codebook[(y.unsqueeze(-1) > mid).sum(-1)]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@contextlib.contextmanager
def quantized_kv(model, keys=None, values=None, pre_rope: bool = False, sinks: int = 0):
    """Pass every layer's keys and values through ``keys(k, layer)`` / ``values(v, layer)``.

    Args:
        model: a transformers Llama model.
        keys: ``(B, H_kv, T, D), layer -> same`` applied after RoPE, or with ``pre_rope`` to the
            keys rotated back (``k cos - rot(k) sin``) and rotated again afterwards; ``None``: exact.
        values: the same for ``v_proj``'s output.
        sinks: the first ``sinks`` tokens of keys and values stay exact (attention sinks).
    """
    layers = [blk.self_attn for blk in model.model.layers]
    current = {}
    handles = [a.register_forward_pre_hook(lambda m, args: current.update(layer=m.layer_idx)) for a in layers]

    def values_hook(a):
        def hook(mod, args, out):  # out (B, T, H_kv * D)
            B, T, _ = out.shape
            v = out.view(B, T, -1, a.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
            v = torch.cat([v[:, :, :sinks], values(v[:, :, sinks:], a.layer_idx)], dim=2)
            return v.transpose(1, 2).reshape(B, T, -1)
        return hook

    if values is not None:
        handles += [a.v_proj.register_forward_hook(values_hook(a)) for a in layers]
    orig = llama.apply_rotary_pos_emb

    def rope_then_quantize(q, k, cos, sin, *args, **kwargs):
        q, k = orig(q, k, cos, sin, *args, **kwargs)
        ks, c, s = k[:, :, sinks:], cos[:, None, sinks:], sin[:, None, sinks:]  # (B, H_kv, T', D), (B, 1, T', D)
        if pre_rope:
            kq = keys(ks * c - rotate_half(ks) * s, current["layer"])
            kq = kq * c + rotate_half(kq) * s
        else:
            kq = keys(ks, current["layer"])
        return q, torch.cat([k[:, :, :sinks], kq], dim=2)

    if keys is not None:
        llama.apply_rotary_pos_emb = rope_then_quantize
    try:
        yield model
    finally:
        llama.apply_rotary_pos_emb = orig
        for h in handles:
            h.remove()


def drift_tolerance(row: str, factor: float = 2.0) -> float:
    """Relative tolerance of a golden row: ``factor`` x the spread (max / min - 1) of its perplexity
    measured across CPU kernel levels and the machine that wrote the golden
    (``benchmarks/results/cpu_drift.json``, from ``benchmarks/cpu_drift.py``), at least :data:`DRIFT_FLOOR`."""
    rows = json.loads(DRIFT.read_text())["rows"]
    return max(factor * rows[row]["spread"], DRIFT_FLOOR)


def eval_ids(tok, splits, n: int) -> torch.Tensor:
    """The first ``n`` token ids ``(n,)`` of the evaluation text (``"\\n\\n"``-joined documents),
    tokenizing a character prefix with a wide margin (BPE is local, so the first ``n`` ids are
    those of the whole text)."""
    ids = tok(splits.joined("eval")[: 16 * n], return_tensors="pt").input_ids[0]
    assert ids.numel() >= n, "evaluation text too short for the golden setting"
    return ids[:n]


@torch.no_grad()
def hf_perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int) -> float:
    """``exp`` of the mean of HF's ``labels=`` loss over the first non-overlapping windows of ``ids (N,)``."""
    n = min(ids.numel() // seqlen, max_windows)
    losses = [model(w[None], labels=w[None]).loss.item() for w in ids[: n * seqlen].view(n, seqlen)]
    return math.exp(sum(losses) / n)  # every window predicts seqlen - 1 tokens: the plain mean is token-weighted


def normalized_uniform(bits: int):
    """Per-token quantizer in KVQuant's normalized space: ``[lo, hi]`` of each token's ``D`` channels
    mapped to [-1, 1] and rounded to the nearest of ``2**bits`` evenly spaced levels: the grid of
    :func:`minmax` in other float arithmetic, in which rounding-boundary cases fall as KVQuant's do."""
    grid = torch.linspace(-1, 1, 2**bits)

    def fn(x, layer):
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        return (nearest(2 * (x - lo) / (hi - lo) - 1, grid) + 1) / 2 * (hi - lo) + lo
    return fn


def kvquant_keys(state: dict):
    """KVQuant's key quantizer from its calibrated state: per-channel ranges ``k_lo/k_hi.{l} (H, D)``,
    values outside them kept exact (dense-and-sparse), the rest normalized to [-1, 1] and rounded to
    the layer's codebook ``k_cb.{l}``."""
    def fn(k, layer):
        lo, hi = state[f"k_lo.{layer}"][None, :, None, :], state[f"k_hi.{layer}"][None, :, None, :]
        y = (2 * (k - lo) / (hi - lo) - 1).clamp(-1, 1)
        k_hat = (nearest(y, state[f"k_cb.{layer}"]) + 1) / 2 * (hi - lo) + lo
        return torch.where((k < lo) | (k > hi), k, k_hat)
    return fn


def kvquant_values(state: dict, outlier_frac: float):
    """KVQuant's value quantizer: per token, the ``round(n * frac / 2)`` largest and smallest values
    over all heads stay exact; each head's remaining range is normalized and rounded to ``v_cb.{l}``."""
    def fn(v, layer):
        B, H, T, D = v.shape
        flat = v.transpose(1, 2).reshape(B, T, H * D)
        k = int(H * D * outlier_frac / 2 + 0.5)
        out = torch.zeros_like(flat, dtype=torch.bool)
        out.scatter_(-1, flat.topk(k, -1).indices, True).scatter_(-1, flat.topk(k, -1, largest=False).indices, True)
        out = out.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        lo = v.masked_fill(out, math.inf).amin(-1, keepdim=True)
        hi = v.masked_fill(out, -math.inf).amax(-1, keepdim=True)
        y = (2 * (v - lo) / (hi - lo) - 1).clamp(-1, 1)
        return torch.where(out, v, (nearest(y, state[f"v_cb.{layer}"]) + 1) / 2 * (hi - lo) + lo)
    return fn
