"""Token-level perplexity over non-overlapping windows (the KVQuant / GPTQ convention).

The evaluation text is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens
(the remainder is dropped); each window is scored independently from an empty cache, and

    ppl = exp( sum of token NLLs / number of predicted tokens )

i.e. the token-weighted mean NLL over all windows (each window predicts ``seqlen - 1`` tokens).
This is *token* perplexity at context ``seqlen``, not lm-eval's word perplexity.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def tokenize_prefix(tok, docs: list[str], n_tokens: int | None) -> torch.Tensor:
    """Token ids ``(N,)`` of ``"\n\n".join(docs)``, stopping once ``n_tokens`` are certainly there.

    The text is cut at a document boundary with a margin, so the first ``n_tokens`` ids equal those
    of tokenizing the whole text (tokenizing ~1M tokens to use 16k would dominate a quick run).
    """
    n_docs = len(docs)
    if n_tokens is not None:
        chars, n_docs = 0, 0
        while n_docs < len(docs) and chars < 8 * n_tokens:
            chars += len(docs[n_docs]) + 2
            n_docs += 1
    while True:
        ids = tok("\n\n".join(docs[:n_docs]), return_tensors="pt").input_ids[0]
        if n_tokens is None or ids.numel() > n_tokens or n_docs == len(docs):
            return ids
        n_docs = min(len(docs), 2 * n_docs)


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """``ids (N,)`` -> ``(n_windows, seqlen)`` non-overlapping windows."""
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on token ids ``(N,)``; returns ``{"ppl", "nll", "tokens", "windows", "seqlen"}``."""
    device = next(model.parameters()).device
    chunks = windows(ids, seqlen, max_windows)
    total_nll, count = 0.0, 0
    for w in tqdm(chunks, desc=f"ppl@{seqlen}", disable=not progress, leave=False):
        x = w.unsqueeze(0).to(device)  # (1, T)
        logits = model(x).logits.float()  # (1, T, V)
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total_nll += nll.item()
        count += seqlen - 1
    mean = total_nll / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": len(chunks), "seqlen": seqlen}


def evaluate(cfg, model, tok, splits, method) -> dict:
    """The ``eval=ppl`` entry point: perplexity of the evaluation split."""
    need = None if cfg.eval.max_windows is None else cfg.eval.seqlen * cfg.eval.max_windows
    ids = tokenize_prefix(tok, splits.eval, need)
    p = perplexity(model, ids, cfg.eval.seqlen, cfg.eval.max_windows, cfg.logging.progress)
    return {"ppl": p["ppl"], "ppl_info": {"kind": "token", "context": p["seqlen"], "tokens": p["tokens"], "windows": p["windows"]}}
