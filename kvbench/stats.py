"""Block-bootstrap intervals for perplexity and for paired perplexity differences (pure numpy).

A perplexity run keeps the NLL sum and the token count of each block of contiguous tokens
(:func:`kvbench.eval.ppl.perplexity`). Tokens inside a block are correlated; blocks far enough apart
are treated as independent, so resampling whole blocks with replacement gives the sampling error of

    ppl = exp( sum(nll[b]) / sum(tokens[b]) )

(a percentile bootstrap of the ratio estimator). Two runs on the same tokens are *paired*: the same
resampled blocks are used for both, so the interval of their difference leaves out the variation of the
text that both runs share (which dominates the unpaired intervals).

Resamples are drawn from ``numpy.random.default_rng(seed)``: the same blocks give the same interval.
At least 2 blocks are needed; with few blocks (a handful of windows) the percentile interval is
too narrow, as every bootstrap on a small sample is.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


def resample_indices(n_blocks: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Block indices of ``resamples`` bootstrap samples, each ``n_blocks`` drawn with replacement.

    Returns:
        ``(resamples, n_blocks)`` int64 array.
    """
    if n_blocks < 1:
        raise ValueError("a bootstrap needs at least one block")
    return np.random.default_rng(seed).integers(0, n_blocks, size=(resamples, n_blocks))


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _check(nll, tokens) -> tuple[np.ndarray, np.ndarray]:
    nll, tokens = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    if nll.ndim != 1 or nll.shape != tokens.shape:
        raise ValueError(f"per-block NLL {nll.shape} and token counts {tokens.shape} must be 1-d of equal length")
    if nll.size < 2:
        raise ValueError(f"a block bootstrap needs at least 2 blocks, got {nll.size}")
    return nll, tokens


def ppl_ci(nll, tokens, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Percentile block-bootstrap interval of ``exp(sum(nll) / sum(tokens))``.

    Args:
        nll: ``(n_blocks,)`` NLL sum of each block (nats).
        tokens: ``(n_blocks,)`` predicted tokens in each block.
        level: coverage of the interval.
        resamples: number of bootstrap samples.
        seed: seed of the resampling.

    Returns:
        ``(lo, hi)`` perplexity bounds.
    """
    nll, tokens = _check(nll, tokens)
    idx = resample_indices(nll.size, resamples, seed)  # (R, n)
    return _percentiles(np.exp(nll[idx].sum(1) / tokens[idx].sum(1)), level)


def paired_delta_ci(nll_ref, nll, tokens, mode: str = "pct", level: float = LEVEL, resamples: int = RESAMPLES,
                    seed: int = SEED) -> tuple[float, float]:
    """Paired block-bootstrap interval of the change of perplexity from ``nll_ref`` to ``nll``.

    Both runs scored the same tokens (same blocks); every bootstrap sample uses the same blocks for
    both, and the statistic is the difference of log-perplexities ``d = (sum(nll) - sum(nll_ref)) /
    sum(tokens)``, reported as ``100 * (exp(d) - 1)`` (``mode="pct"``, the change in %) or as
    ``ppl - ppl_ref`` (``mode="diff"``).

    Args:
        nll_ref: ``(n_blocks,)`` per-block NLL sums of the reference run.
        nll: ``(n_blocks,)`` per-block NLL sums of the compared run.
        tokens: ``(n_blocks,)`` predicted tokens per block (equal in both runs).
        mode: ``"pct"`` or ``"diff"``.
        level: coverage of the interval.
        resamples: number of bootstrap samples.
        seed: seed of the resampling.

    Returns:
        ``(lo, hi)`` bounds of the change (% or perplexity units).
    """
    nll_ref, tokens = _check(nll_ref, tokens)
    nll, _ = _check(nll, tokens)
    if mode not in ("pct", "diff"):
        raise ValueError(f"mode must be pct or diff, not {mode!r}")
    idx = resample_indices(nll.size, resamples, seed)  # (R, n)
    t = tokens[idx].sum(1)
    log_ref, log_new = nll_ref[idx].sum(1) / t, nll[idx].sum(1) / t
    samples = 100 * np.expm1(log_new - log_ref) if mode == "pct" else np.exp(log_new) - np.exp(log_ref)
    return _percentiles(samples, level)
