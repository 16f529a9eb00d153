"""Token-level perplexity over non-overlapping windows (the KVQuant / GPTQ convention).

The evaluation text is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens
(the remainder is dropped); each window is scored independently from an empty cache, and

    ppl = exp( sum of token NLLs / number of predicted tokens )

i.e. the token-weighted mean NLL over all windows (each window predicts ``seqlen - 1`` tokens).
This is *token* perplexity at context ``seqlen``, not lm-eval's word perplexity.

Error bars: the token NLLs are summed per block of ``BLOCK`` contiguous predicted tokens (a window's
last block is shorter; blocks never cross windows), and ``ppl_ci95`` is a block bootstrap over them
(:mod:`kvbench.stats`). The per-block sums are kept in the results so that two runs on the same
tokens can be compared pairwise.
"""

from __future__ import annotations

import hashlib
import math

import torch
from tqdm.auto import tqdm

from kvbench import stats
from kvbench.registry import register

BLOCK = 128  # predicted tokens per bootstrap block: long enough that neighbouring blocks are nearly independent


def check_window_args(seqlen: int, max_windows: int | None) -> None:
    """Raise ``ValueError`` unless ``seqlen >= 2`` (a window predicts ``seqlen - 1``) and ``max_windows >= 1``."""
    if seqlen < 2:
        raise ValueError(f"eval.seqlen must be >= 2 (a window of seqlen tokens predicts seqlen - 1), got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"eval.max_windows must be >= 1 or null (all windows), got {max_windows}")


def tokenize_prefix(tok, docs: list[str], n_tokens: int | None) -> torch.Tensor:
    """Token ids ``(N,)`` of ``"\n\n".join(docs)``, stopping once ``n_tokens`` are certainly there.

    The text is cut at a document boundary with a margin, so the first ``n_tokens`` ids equal those
    of tokenizing the whole text (tokenizing ~1M tokens to use 16k would dominate a quick run).

    Raises:
        ValueError: ``n_tokens < 1``.
    """
    if n_tokens is not None and n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1 or None, got {n_tokens}")
    n_docs = len(docs)
    if n_tokens is not None:
        chars, n_docs = 0, 0
        while n_docs < len(docs) and chars < 8 * n_tokens:
            chars += len(docs[n_docs]) + 2
            n_docs += 1
    while True:
        ids = tok("\n\n".join(docs[:n_docs]), return_tensors="pt").input_ids[0]
        if n_tokens is None or ids.numel() > n_tokens or n_docs >= len(docs):
            return ids
        n_docs = min(len(docs), max(n_docs + 1, 2 * n_docs))


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """``ids (N,)`` -> ``(n_windows, seqlen)`` non-overlapping windows.

    Raises:
        ValueError: ``seqlen < 2``, ``max_windows < 1``, or fewer than ``seqlen`` tokens.
    """
    check_window_args(seqlen, max_windows)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, progress: bool = True,
               block: int = BLOCK, batch_size: int = 1) -> dict:
    """Perplexity of ``model`` on token ids ``(N,)``, with per-block NLL sums and a 95 % interval.

    Args:
        model: a causal LM returning ``.logits`` ``(1, T, V)``.
        ids: ``(N,)`` token ids, cut into windows by :func:`windows`.
        seqlen: window length ``T``.
        max_windows: at most this many windows (None: all).
        progress: show a progress bar.
        block: predicted tokens per bootstrap block; each window's ``seqlen - 1`` predictions are cut
            into blocks of ``block`` (the last one shorter), never crossing a window.
        batch_size: windows per forward (``eval.batch_size``): the same numbers up to float rounding,
            the method's per-forward cost shared by more tokens (on a GPU).

    Returns:
        ``{"ppl", "nll" (mean per token), "tokens", "windows", "seqlen", "ci95": [lo, hi] (None for a single block),
        "blocks": {"size", "nll": [per-block NLL sums], "tokens": [per-block counts], "ids": digest}}``.
    """
    device = next(model.parameters()).device
    chunks = windows(ids, seqlen, max_windows)
    sums, block_tokens = [], []
    n_blocks = -(-(seqlen - 1) // block)
    for x in tqdm(chunks.split(batch_size), desc=f"ppl@{seqlen}", disable=not progress, leave=False):
        x = x.to(device)  # (b, T)
        logits = model(x).logits.float()  # (b, T, V)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        nll = nll.double().view(x.shape[0], -1)  # (b, T-1); classes on the last axis (the transposed form is less exact)
        padded = torch.nn.functional.pad(nll, (0, n_blocks * block - nll.shape[1]))  # zeros: sums unchanged
        sums.append(padded.view(-1, n_blocks, block).sum(-1).flatten())  # (b * n_blocks,), kept on the device
        block_tokens += [min(block, seqlen - 1 - j * block) for j in range(n_blocks)] * x.shape[0]
    block_nll = torch.cat(sums).tolist()  # the one wait for the device
    count = sum(block_tokens)
    mean = math.fsum(block_nll) / count
    digest = hashlib.sha256(chunks.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": len(chunks), "seqlen": seqlen,
            "ci95": list(stats.ppl_ci(block_nll, block_tokens)) if len(block_nll) > 1 else None,
            "blocks": {"size": block, "nll": block_nll, "tokens": block_tokens, "ids": digest}}


@register("eval", "ppl")
def evaluate(cfg, model, tok, splits, method) -> dict:
    """The ``eval=ppl`` entry point: perplexity of the evaluation split, its 95 % interval and per-block NLLs."""
    check_window_args(cfg.eval.seqlen, cfg.eval.max_windows)
    need = None if cfg.eval.max_windows is None else cfg.eval.seqlen * cfg.eval.max_windows
    ids = tokenize_prefix(tok, splits.eval, need)
    p = perplexity(model, ids, cfg.eval.seqlen, cfg.eval.max_windows, cfg.logging.progress, batch_size=cfg.eval.batch_size)
    return {"ppl": p["ppl"], "ppl_ci95": p["ci95"], "ppl_blocks": p["blocks"],
            "ppl_info": {"kind": "token", "context": p["seqlen"], "tokens": p["tokens"], "windows": p["windows"]}}
