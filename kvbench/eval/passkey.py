"""Long-context retrieval: a synthetic passkey ("needle in a haystack") task scored by exact match.

A prompt of exactly ``length`` tokens is an instruction, filler text from the embedded Wikipedia
evaluation split, a needle (``The pass key is 71432. Remember it. 71432 is the pass key.``) placed
at ``depth`` (0 = right after the instruction, 1 = right before the question) of the filler, and
the question ``What is the pass key? The pass key is``. The model decodes greedily through
``generate()`` (so through the quantizing cache when a method is patched in); a trial is correct iff
the first number in the answer equals the passkey. Everything is seeded: the passkey and the filler
offset of each (length, depth, trial) come from ``random.Random(f"{seed}/{length}/{depth}/{trial}")``.

``metrics.json`` gets ``passkey: {acc, by_length: {L: acc}, grid: {L: {depth: acc}}}``.
"""

from __future__ import annotations

import random
import re

import torch
from tqdm.auto import tqdm

from kvbench.errors import UserError

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important info there.\n\n"
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
MAX_NEW_TOKENS = 10


def filler_ids(tok, text: str, n_tokens: int) -> torch.Tensor:
    """Token ids ``(N,)`` of the filler text, at least ``n_tokens`` long (the text is repeated if short)."""
    if not text.strip():
        raise UserError("passkey: the filler text is empty")
    chars = (n_tokens + 64) * 8  # generous: English wiki text is ~4-5 characters per token
    while len(text) < chars:
        text = text + "\n\n" + text
    ids = tok(text[:chars], add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        raise UserError(f"passkey: the filler text gives {ids.numel()} tokens, fewer than {n_tokens}")
    return ids


def build_prompt(tok, filler: torch.Tensor, length: int, depth: float, key: str, offset: int) -> torch.Tensor:
    """Token ids ``(length,)``: [BOS] instruction, filler[:a], needle, filler[a:b], question.

    Args:
        filler: filler token ids ``(N,)``; the slice used starts at ``offset``.
        length: total prompt length in tokens.
        depth: position of the needle as a fraction of the filler (0..1).
        key: the passkey digits.
    """
    enc = lambda s: tok(s, add_special_tokens=False, return_tensors="pt").input_ids[0]  # noqa: E731
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", True) else []
    head = torch.cat([torch.tensor(bos, dtype=torch.long), enc(INSTRUCTION)])
    needle, question = enc(NEEDLE.format(key=key)), enc(QUESTION)
    n_fill = length - head.numel() - needle.numel() - question.numel()
    if n_fill < 0:
        raise UserError(f"passkey: a prompt of {length} tokens is too short for the instruction and question")
    fill = filler[offset: offset + n_fill]
    a = round(depth * n_fill)
    ids = torch.cat([head, fill[:a], needle, fill[a:], question])
    assert ids.numel() == length
    return ids


def answer_correct(answer: str, key: str) -> bool:
    """Exact match: the first number in the model's answer is the passkey."""
    m = re.search(r"\d+", answer)
    return m is not None and m.group(0) == key


def trial_spec(seed: int, length: int, depth: float, trial: int, room: int) -> tuple[str, int]:
    """The (passkey, filler offset) of one trial; independent of the order trials run in."""
    rng = random.Random(f"{seed}/{length}/{depth}/{trial}")
    return str(rng.randint(10000, 99999)), rng.randint(0, max(0, room))


@torch.no_grad()
def passkey_grid(model, tok, text: str, lengths, depths, trials: int = 1, seed: int = 0, progress: bool = True) -> dict:
    """Run the depth x length grid.

    Args:
        model: a causal LM (patched or not); decoding uses ``model.generate``.
        tok: its tokenizer.
        text: filler text.
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1].
        trials: passkeys per cell.

    Returns:
        ``{"acc", "by_length": {L: acc}, "grid": {L: {depth: acc}}, "trials", "answers": [...]}``
        (keys of the dicts are strings, as in JSON).
    """
    for d in depths:
        if not 0 <= d <= 1:
            raise UserError(f"eval.passkey_depths must lie in [0, 1], got {d}")
    if trials < 1:
        raise UserError(f"eval.passkey_trials must be >= 1, got {trials}")
    device = next(model.parameters()).device
    longest = max(lengths)
    filler = filler_ids(tok, text, 2 * longest)
    room = filler.numel() - longest
    grid, answers = {}, []
    cells = [(L, d, t) for L in lengths for d in depths for t in range(trials)]
    for L, d, t in tqdm(cells, desc="passkey", disable=not progress, leave=False):
        key, offset = trial_spec(seed, L, d, t, room)
        ids = build_prompt(tok, filler, L, d, key, offset).unsqueeze(0).to(device)  # (1, L)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        answer = tok.decode(out[0, L:], skip_special_tokens=True)
        ok = answer_correct(answer, key)
        grid.setdefault(str(L), {}).setdefault(str(float(d)), []).append(float(ok))
        answers.append({"length": L, "depth": float(d), "trial": t, "key": key, "answer": answer.strip(), "correct": ok})
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    by_length = {L: mean([x for cell in row.values() for x in cell]) for L, row in grid.items()}
    grid = {L: {d: mean(cell) for d, cell in row.items()} for L, row in grid.items()}
    return {
        "acc": mean([a["correct"] for a in answers]),
        "by_length": by_length,
        "grid": grid,
        "trials": trials,
        "answers": answers,
    }


def evaluate(cfg, model, tok, splits, method) -> dict:
    """The ``eval=passkey`` entry point (the model is already patched by :func:`kvbench.run.evaluate`)."""
    e = cfg.eval
    lengths = sorted({int(x) for x in e.passkey_lengths})
    limit = method.info.max_context
    too_long = [L for L in lengths if L > limit]
    if too_long:
        raise UserError(f"eval.passkey_lengths {too_long} exceed {method.info.name}'s context of {limit} tokens")
    res = passkey_grid(model, tok, splits.joined("eval"), lengths, list(e.passkey_depths), e.passkey_trials, cfg.seed, cfg.logging.progress)
    for L, acc in res["by_length"].items():
        row = " ".join(f"{float(d):.2f}:{v:.2f}" for d, v in res["grid"][L].items())
        print(f"kvbench | passkey @{L}: acc {acc:.3f} (by depth {row})")
    answers = res.pop("answers")
    return {"passkey": res, "passkey_info": {"lengths": lengths, "depths": list(e.passkey_depths), "answers": answers}}
