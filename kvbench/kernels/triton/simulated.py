"""Fused kernels of the *simulated* backend on a GPU: one launch where PyTorch takes dozens.

At 2048 tokens an 8B model's forward is so short that the simulated quantizers' many small PyTorch
operations (and their host synchronisations) cost more than their arithmetic (``benchmarks/results/
gpu_pipeline.json``, run 3 against run 5). Each kernel here is the fused twin of a PyTorch definition, which
stays the reference (CPU, and the tests):

- :func:`fake_quant_tokens`: quantize-dequantize ``(B, H, T, D)`` with one code range per token, head and
  group of channels, or with given per-channel ranges (KVQuant's calibrated keys); uniform grid or a
  codebook (NUQ); dense-and-sparse outliers per token over all heads (top-k / bottom-k) or by the
  channel thresholds; optional per-channel shift and scale (QoKV) and a code width per token (QoKV's
  token groups). Twin of :meth:`methods.kvquant.KVQuant._quantize` and :func:`kvbench.quant.fake_quantize_affine`.
- :func:`received_sums`: the causal attention probabilities each key receives, summed over the queries, in two
  passes (log-sum-exp per query, then column sums of the probabilities), with no ``(T_q, T)`` tensor; QoKV's
  scores (:func:`methods.components.grouping.received_attention`) divide them as for the PyTorch twin.

Float rounding may differ from the twins in the last bit (fused multiply-adds); a code decision differs
only for a value within that rounding of a decision boundary, and outlier choice only among ties.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import dummy


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _mark_extremes(x, valid, idx, K: tl.constexpr, LARGEST: tl.constexpr):
    """Mask of the ``K`` largest (or smallest) entries of ``x`` among ``valid`` (first index on ties)."""
    BIG: tl.constexpr = 1 << 30
    work = tl.where(valid, x, -float("inf") if LARGEST else float("inf"))
    marked = idx < 0  # all False
    for _ in tl.static_range(K):
        if LARGEST:
            m = tl.max(tl.max(work, axis=1), axis=0)
        else:
            m = tl.min(tl.min(work, axis=1), axis=0)
        first = tl.min(tl.min(tl.where(work == m, idx, BIG), axis=1), axis=0)
        hit = idx == first
        marked = marked | hit
        work = tl.where(hit, -float("inf") if LARGEST else float("inf"), work)
    return marked


@triton.jit
def _fake_quant_kernel(x_ptr, out_ptr, cb_ptr, lo_ptr, hi_ptr, shift_ptr, scale_ptr, qmax_ptr, count_ptr,
                       H, T, sxb, sxh, sxt, QMAX,
                       D: tl.constexpr, HP: tl.constexpr, G: tl.constexpr, NC: tl.constexpr,
                       K_OUT: tl.constexpr, CHANNEL: tl.constexpr, HAS_CB: tl.constexpr, HAS_SHIFT: tl.constexpr,
                       HAS_SCALE: tl.constexpr, TOKEN_QMAX: tl.constexpr, THRESH_OUT: tl.constexpr):
    """One program per (batch row, token): the token's ``(H, D)`` slice of every head."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, D)
    valid = (offs_h < H)[:, None] & (offs_d < D)[None, :]  # (HP, D)
    hd = offs_h[:, None] * D + offs_d[None, :]  # per-(head, channel) index of calibrated vectors
    x_in = tl.load(x_ptr + b * sxb + offs_h[:, None] * sxh + t * sxt + offs_d[None, :], mask=valid, other=0.0)
    x = x_in.to(tl.float32)
    y = x
    if HAS_SHIFT:
        y = y - tl.load(shift_ptr + hd, mask=valid, other=0.0)
    if HAS_SCALE:
        y = tl.div_rn(y, tl.load(scale_ptr + hd, mask=valid, other=1.0))
    if TOKEN_QMAX:
        qmax = tl.load(qmax_ptr + b * T + t).to(tl.float32)
    else:
        qmax = QMAX * 1.0
    if CHANNEL:  # calibrated per-channel ranges; outliers are what falls outside them
        lo = tl.load(lo_ptr + hd, mask=valid, other=0.0)
        hi = tl.load(hi_ptr + hd, mask=valid, other=1.0)
        if THRESH_OUT:
            out_mask = ((y < lo) | (y > hi)) & valid
        else:
            out_mask = offs_h[:, None] < 0
    else:
        if K_OUT > 0:
            idx = hd
            out_mask = _mark_extremes(y, valid, idx, K_OUT, True) | _mark_extremes(y, valid, idx, K_OUT, False)
        else:
            out_mask = offs_h[:, None] < 0
        y3 = tl.reshape(y, (HP, D // G, G))
        m3 = tl.reshape(out_mask | ~valid, (HP, D // G, G))
        lo3 = tl.min(tl.where(m3, float("inf"), y3), axis=2)
        hi3 = tl.max(tl.where(m3, -float("inf"), y3), axis=2)
        lo3 = tl.where(lo3 == float("inf"), 0.0, lo3)  # a group of outliers only (or padding): any finite range
        hi3 = tl.where(hi3 == -float("inf"), 0.0, hi3)
        lo = tl.reshape(tl.broadcast_to(lo3[:, :, None], (HP, D // G, G)), (HP, D))
        hi = tl.reshape(tl.broadcast_to(hi3[:, :, None], (HP, D // G, G)), (HP, D))
    if HAS_CB:  # normalise to [-1, 1], nearest centroid (bucketize on the midpoints), back
        width = tl.maximum(hi - lo, 1e-8)
        yn = tl.minimum(tl.maximum(tl.div_rn(2.0 * (y - lo), width) - 1.0, -1.0), 1.0)
        code = tl.zeros((HP, D), tl.int32)
        for k in tl.static_range(NC - 1):
            sp = (tl.load(cb_ptr + k) + tl.load(cb_ptr + k + 1)) * 0.5
            code += (yn > sp).to(tl.int32)
        c = tl.load(cb_ptr + code)
        x_hat = (c + 1.0) * 0.5 * width + lo
    else:  # uniform affine grid with the range's minimum as zero point (kvbench.quant.quantize_affine)
        s = tl.maximum(tl.div_rn(hi - lo, qmax), 1e-8)
        code = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(y - lo, s)), 0.0), qmax)
        x_hat = code * s + lo
    if HAS_SCALE:
        x_hat = x_hat * tl.load(scale_ptr + hd, mask=valid, other=1.0)
    if HAS_SHIFT:
        x_hat = x_hat + tl.load(shift_ptr + hd, mask=valid, other=0.0)
    x_hat = tl.where(out_mask, x, x_hat)
    tl.store(out_ptr + ((b * H + offs_h[:, None]) * T + t) * D + offs_d[None, :], x_hat.to(x_in.dtype), mask=valid)
    if K_OUT > 0 or THRESH_OUT:
        tl.atomic_add(count_ptr, tl.sum(tl.sum(out_mask.to(tl.int64), axis=1), axis=0))


def fake_quant_tokens(x: torch.Tensor, *, bits: int | None = None, token_bits: torch.Tensor | None = None,
                      group: int | None = None, codebook: torch.Tensor | None = None, outliers_per_side: int = 0,
                      channel_range: tuple[torch.Tensor, torch.Tensor] | None = None, threshold_outliers: bool = False,
                      shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                      outlier_count: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x (B, H, T, D)`` (last axis contiguous) in one launch; same shape and dtype.

    Args:
        bits: code width of every token (uniform grid: ``2**bits - 1`` steps); or
        token_bits: ``(B, T)`` int width of each token (uniform grid only).
        group: channels per code range (per-token ranges); ``None``: all ``D``.
        codebook: sorted centroids ``(K,)`` fp32 on ``[-1, 1]``; the range is mapped onto ``[-1, 1]``
            (values clamped into it) and rounded to the nearest centroid.
        outliers_per_side: per token, the ``k`` largest and ``k`` smallest values over all heads are kept
            exact and left out of the ranges (KVQuant's dense-and-sparse values).
        channel_range: calibrated ``(lo, hi)`` ``(H, D)`` instead of per-token ranges;
        threshold_outliers: with it, values outside ``[lo, hi]`` are kept exact.
        shift, scale: ``(H, D)``: quantize ``(x - shift) / scale`` and map back (QoKV's channel balancing).
        outlier_count: a device int64 scalar the number of kept outliers is added to (no host sync).
    """
    B, H, T, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    G = group or D
    if D & (D - 1) or D % G or G & (G - 1):
        raise ValueError(f"fused quantizer needs power-of-two head_dim and group, got D={D}, group={G}")
    out = torch.empty(B, H, T, D, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    dev, dmy = x.device, dummy(x.device)
    f32 = lambda t: dmy if t is None else t.to(dev, torch.float32).contiguous()  # noqa: E731
    lo, hi = channel_range if channel_range is not None else (None, None)
    tq = None if token_bits is None else token_bits.to(dev, torch.int32).contiguous()
    qmax = None if tq is None else (1 << tq) - 1
    counting = outliers_per_side > 0 or (channel_range is not None and threshold_outliers)
    if counting and outlier_count is None:
        outlier_count = torch.zeros((), dtype=torch.int64, device=dev)
    _fake_quant_kernel[(B, T)](
        x, out, f32(codebook), f32(lo), f32(hi), f32(shift), f32(scale), dmy if qmax is None else qmax,
        outlier_count if counting else dmy,
        H, T, x.stride(0), x.stride(1), x.stride(2), (1 << (bits or 1)) - 1,
        D=D, HP=triton.next_power_of_2(H), G=G, NC=0 if codebook is None else codebook.numel(),
        K_OUT=0 if channel_range is not None else outliers_per_side, CHANNEL=channel_range is not None,
        HAS_CB=codebook is not None, HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
        TOKEN_QMAX=qmax is not None, THRESH_OUT=channel_range is not None and threshold_outliers,
    )
    return out


# -- received attention (QoKV's token importance) ----------------------------------------------------------


@triton.jit
def _lse_kernel(q_ptr, k_ptr, lse_ptr, Hq, Tq, T, q_start, G, sqb, sqh, sqt, skb, skh, skt, sm_scale,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Log-sum-exp of every query's causal logits (``(B, H_q, T_q)``), online over key blocks."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    qpos = q_start + offs_m
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=(offs_m < Tq)[:, None], other=0.0)
    k_base = k_ptr + b * skb + (h // G) * skh
    m_i = tl.full((BM,), -float("inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    seen = tl.minimum(T, q_start + (tl.program_id(1) + 1) * BM)
    for n0 in range(0, seen, BN):
        offs_n = n0 + tl.arange(0, BN)
        k = tl.load(k_base + offs_n[None, :] * skt + offs_d[:, None], mask=(offs_n < T)[None, :], other=0.0)  # (D, BN)
        s = tl.dot(q, k, input_precision=PREC) * sm_scale
        s = tl.where((offs_n[None, :] <= qpos[:, None]) & (offs_n < T)[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + bh * Tq + offs_m, m_i + tl.log(l_i), mask=offs_m < Tq)


@triton.jit
def _received_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, Hq, Tq, T, q_start, lo, n, G,
                     sqb, sqh, sqt, skb, skh, skt, sm_scale,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Sum over queries of the probabilities of the keys ``lo + [j0, j0 + BN)`` (``(B, H_q, n)``)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    offs_n = lo + tl.program_id(1) * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    live = offs_n < lo + n
    k = tl.load(k_ptr + b * skb + (h // G) * skh + offs_n[None, :] * skt + offs_d[:, None], mask=live[None, :], other=0.0)
    acc = tl.zeros((BN,), tl.float32)
    first_q = tl.maximum(lo + tl.program_id(1) * BN - q_start, 0) // BM * BM  # earliest query that sees a key here
    for m0 in range(first_q, Tq, BM):
        offs_m = m0 + tl.arange(0, BM)
        q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=(offs_m < Tq)[:, None], other=0.0)
        lse = tl.load(lse_ptr + bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
        s = tl.dot(q, k, input_precision=PREC) * sm_scale
        p = tl.exp(s - lse[:, None])
        p = tl.where((offs_n[None, :] <= (q_start + offs_m)[:, None]) & (offs_m < Tq)[:, None] & live[None, :], p, 0.0)
        acc += tl.sum(p, axis=0)
    tl.store(out_ptr + bh * n + (offs_n - lo), acc, mask=live)


def received_sums(query: torch.Tensor, keys: torch.Tensor, query_start: int, lo: int, hi: int) -> torch.Tensor:
    """Causal attention probabilities of the keys ``[lo, hi)`` summed over the queries, ``(B, H_q, n)``: the fused
    twin of ``_received_sums`` in :mod:`methods.components.grouping` (whose ``received_attention`` normalises both)."""
    B, Hq, Tq, D = query.shape
    H_kv, T = keys.shape[1], keys.shape[-2]
    n = hi - lo
    if D & (D - 1):
        raise ValueError(f"fused received attention needs a power-of-two head_dim, got {D}")
    q = query if query.stride(-1) == 1 else query.contiguous()
    k = keys if keys.stride(-1) == 1 else keys.contiguous()
    if q.dtype != k.dtype:
        q, k = q.float(), k.float()
    received = torch.zeros(B, Hq, max(n, 0), dtype=torch.float32, device=q.device)
    if n <= 0:
        return received
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    BM, BN = 64, 64
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), 1 / math.sqrt(D))
    G = Hq // H_kv
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # 16-bit inputs: products exact, fp32 sums
    _lse_kernel[(B * Hq, triton.cdiv(Tq, BM))](q, k, lse, Hq, Tq, T, query_start, G, *common, D=D, BM=BM, BN=BN,
                                               PREC=prec)
    _received_kernel[(B * Hq, triton.cdiv(n, BN))](q, k, lse, received, Hq, Tq, T, query_start, lo, n, G, *common,
                                                    D=D, BM=BM, BN=BN, PREC=prec)
    return received
