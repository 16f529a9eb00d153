"""Token grouping by the attention a token receives (QoKV's importance), with exact group shares.

Used by ``qokv`` and usable by any method: a score per token, then groups of mixed bit widths.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch


def group_counts(shares: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Tokens of each group among absolute positions ``[lo, hi)``.

    Cumulative rounding over positions, so chunks of any size (one token at a time while
    decoding) add up to the declared shares of the whole sequence.

    Args:
        shares: ``(G,)`` token shares, most important first, summing to 1.
        lo, hi: absolute positions of the chunk.

    Returns:
        ``(G,)`` int64 counts summing to ``hi - lo``.
    """
    cum = torch.cumsum(shares.double(), 0)
    cum[-1] = 1.0

    def upto(x: int) -> torch.Tensor:
        return torch.floor(cum * x + 0.5).long()

    c = torch.diff(upto(hi) - upto(lo), prepend=torch.zeros(1, dtype=torch.long))
    return c


def assign_groups(scores: torch.Tensor, counts: torch.Tensor, forced: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rank tokens by score and cut the ranking into groups of the given sizes.

    Args:
        scores: ``(B, n)`` importance of each token (higher = more important).
        counts: ``(G,)`` tokens per group, summing to ``n``; group 0 is the top group.
        forced: ``(n,)`` bool, tokens that must land in group 0 (it grows if needed, taking the
            places from the next groups).

    Returns:
        ``(B, n)`` int64 group index of every token.
    """
    n = scores.shape[-1]
    s = scores.float()
    counts = counts.clone()
    if forced is not None and forced.any():  # forced and counts on the host (no wait for the device)
        s = torch.where(forced.to(s.device, non_blocking=True), torch.full_like(s, math.inf), s)
        extra = int(forced.sum()) - int(counts[0])
        g = 1
        while extra > 0 and g < len(counts):
            take = min(extra, int(counts[g]))
            counts[0] += take
            counts[g] -= take
            extra -= take
            g += 1
    order = torch.argsort(s, dim=-1, descending=True, stable=True)  # (B, n)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=s.device).expand_as(order))
    bounds = torch.cumsum(counts, 0).to(s.device, non_blocking=True)  # (G,)
    return torch.bucketize(rank, bounds, right=True).clamp_max(len(counts) - 1)


def threshold_groups(scores: torch.Tensor, thresholds: list[float], forced: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Groups by score relative to its mean: group ``g`` holds ``thresholds[g-1] > s/mean >= thresholds[g]``.

    Args:
        scores: ``(B, n)``.
        thresholds: ``G - 1`` descending thresholds.
        forced: ``(n,)`` bool, tokens put in group 0.

    Returns:
        ``(B, n)`` int64 group index.
    """
    rel = scores.float() / scores.float().mean(-1, keepdim=True).clamp_min(1e-12)
    t = torch.tensor(sorted(thresholds), dtype=rel.dtype).to(rel.device, non_blocking=True)  # ascending
    groups = len(thresholds) - torch.bucketize(rel, t, right=True)
    if forced is not None:
        groups = torch.where(forced.to(groups.device, non_blocking=True), torch.zeros_like(groups), groups)
    return groups


def received_attention(query: torch.Tensor, keys: torch.Tensor, query_start: int, lo: int, hi: int,
                       block_bytes: int = 1 << 30) -> torch.Tensor:
    """Average attention each key in ``[lo, hi)`` receives from the queries that see it.

    Computed in blocks of queries, so no ``(B, H_q, T_q, T)`` tensor exists: each block's causal
    softmax covers every key its queries see, so blocking is exact (up to summation order). At 32k
    tokens and 32 heads the dense probabilities would be 137 GB per layer; a block holds about
    ``block_bytes`` of fp32 logits.

    Args:
        query: ``(B, H_q, T_q, D)`` post-RoPE queries at absolute positions
            ``query_start .. query_start + T_q - 1``.
        keys: ``(B, H_kv, T, D)`` post-RoPE keys at positions ``0 .. T - 1`` (GQA: ``H_q % H_kv == 0``).
        lo, hi: the keys to score.
        block_bytes: fp32 logits per block of queries (memory bound, not a result).

    Returns:
        ``(B, hi - lo)``: attention probabilities (causal softmax with scaling ``1/sqrt(D)``) summed
        over the queries at or after each key, divided by their number, averaged over query heads.
    """
    from kvbench.kernels import fused_simulated

    if fused_simulated(query):
        from kvbench.kernels.triton.simulated import received_sums
    else:
        received_sums = functools.partial(_received_sums, block_bytes=block_bytes)
    received = received_sums(query, keys, query_start, lo, hi)  # (B, H_q, n)
    qpos = torch.arange(query_start, query_start + query.shape[-2], device=query.device)
    seen_by = (qpos[None, :] >= torch.arange(lo, hi, device=query.device)[:, None]).sum(-1).clamp_min(1)  # (n,)
    return received.mean(1) / seen_by  # (B, n)


def _received_sums(query: torch.Tensor, keys: torch.Tensor, query_start: int, lo: int, hi: int,
                   block_bytes: int) -> torch.Tensor:
    """Causal attention probabilities of the keys ``[lo, hi)`` summed over the queries, ``(B, H_q, n)``, a block
    of queries at a time."""
    B, H, Tq, D = query.shape
    H_kv, T = keys.shape[1], keys.shape[-2]
    g = H // H_kv
    # bf16/fp16 on a GPU: TF32 matrix units hold their values exactly (products exact, fp32 sums), so the
    # logits are fp32's up to summation order when the 1/sqrt(D) scale comes after the product
    tf32 = query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and keys.dtype == query.dtype
    k = keys.float().transpose(-1, -2).unsqueeze(2)  # (B, H_kv, 1, D, T)
    q = query.float().view(B, H_kv, g, Tq, D)  # (B, H_kv, g, T_q, D)
    if not tf32:
        q = q / math.sqrt(D)
    block = max(1, block_bytes // (4 * B * H * max(T, 1)))
    received = torch.zeros(B, H_kv, g, hi - lo, device=query.device)  # (B, H_kv, g, n)
    for q0 in range(0, Tq, block):
        q1 = min(Tq, q0 + block)
        seen = min(T, query_start + q1)  # keys any query of the block sees
        if seen <= lo:
            continue
        with _tf32_matmul(tf32):
            logits = q[..., q0:q1, :] @ k[..., :seen]  # (B, H_kv, g, q1 - q0, seen)
        if tf32:
            logits.div_(math.sqrt(D))
        qpos = torch.arange(query_start + q0, query_start + q1, device=query.device)
        visible = torch.arange(seen, device=query.device)[None, :] <= qpos[:, None]  # (q1 - q0, seen)
        p = torch.softmax(logits.masked_fill_(~visible, -math.inf), dim=-1)
        received[..., : max(0, min(hi, seen) - lo)] += p[..., lo:hi].sum(-2)
    return received.flatten(1, 2)


@contextlib.contextmanager
def _tf32_matmul(on: bool):
    """TF32 CUDA matmuls inside the block (only for inputs TF32 represents exactly); restored after."""
    if not on:
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
