"""Long-context retrieval: a synthetic passkey ("needle in a haystack") task scored by exact match.

A prompt of exactly ``length`` tokens is an instruction, filler text from the embedded Wikipedia
evaluation split, a needle (``The pass key is 71432. Remember it. 71432 is the pass key.``) placed
at ``depth`` (0 = right after the instruction, 1 = right before the question) of the filler, and
the question ``What is the pass key? The pass key is``. The model decodes greedily through
``generate()`` (so through the quantizing cache when a method is patched in); a trial is correct iff
the first number in the answer equals the passkey. Everything is seeded: the passkey and the filler
offset of each (length, depth, trial) come from ``random.Random(f"{seed}/{length}/{depth}/{trial}")``.

``metrics.json`` gets ``passkey_acc`` and ``passkey: {L: {acc, depth_0, depth_25, ...}}`` (the grid).
"""

from __future__ import annotations

import random
import re

import torch
from tqdm.auto import tqdm

from kvbench.errors import UserError
from kvbench.registry import register

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important info there.\n\n"
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
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


def prompt_parts(tok, chat: bool) -> tuple[str, str]:
    """The text before the haystack and after it (question and answer cue).

    With ``chat``, the instruction, haystack and question form one user turn of the tokenizer's chat
    template and the assistant's turn starts with the answer cue ``The pass key is``.
    """
    if not chat:
        return INSTRUCTION, QUESTION
    mark = "\x00HAYSTACK\x00"
    question, cue = QUESTION.rsplit("?", 1)
    text = tok.apply_chat_template([{"role": "user", "content": INSTRUCTION + mark + question + "?"}], tokenize=False,
                                   add_generation_prompt=True)
    head, tail = text.split(mark)
    return head, tail + cue.strip()


def sentence_starts(tok, ids: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: token ``i`` starts a sentence (``". Next"``): a clean place to cut the filler."""
    pieces = tok.batch_decode(ids.view(-1, 1))
    ends = torch.tensor([p.endswith((".", "!", "?")) for p in pieces])
    spaced = torch.tensor([p.startswith(" ") for p in pieces])
    return torch.cat([torch.tensor([False]), ends[:-1]]) & spaced


def build_prompt(tok, filler: torch.Tensor, length: int, depth: float, key: str, offset: int, chat: bool = False,
                 starts: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids ``(length,)``: instruction, filler[:a], needle, filler[a:b], question.

    Args:
        filler: filler token ids ``(N,)``; the slice used starts at ``offset``.
        length: total prompt length in tokens.
        depth: position of the needle as a fraction of the filler (0..1).
        key: the passkey digits.
        chat: wrap the prompt in the tokenizer's chat template (see :func:`prompt_parts`).
        starts: :func:`sentence_starts` of ``filler``; if given, the filler slice begins and the
            needle sits at the sentence start nearest to ``offset`` / the depth.
    """
    enc = lambda s, special=False: tok(s, add_special_tokens=special, return_tensors="pt").input_ids[0]  # noqa: E731
    head_text, tail_text = prompt_parts(tok, chat)
    head = enc(head_text, special=not chat)  # BOS where the tokenizer adds one (the chat template has its own)
    needle, question = enc(NEEDLE.format(key=key)), enc(tail_text)
    n_fill = length - head.numel() - needle.numel() - question.numel()
    if n_fill < 0:
        raise UserError(f"passkey: a prompt of {length} tokens is too short for the instruction and question")
    a = round(depth * n_fill)
    if starts is not None:  # begin the filler at a sentence; put the needle between two sentences
        later = torch.nonzero(starts[offset: filler.numel() - n_fill + 1]).flatten()
        offset += int(later[0]) if later.numel() else 0
        inner = torch.nonzero(starts[offset + 1: offset + n_fill]).flatten() + 1
        if 0 < a < n_fill and inner.numel():
            a = int(inner[(inner - a).abs().argmin()])
    fill = filler[offset: offset + n_fill]
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
def passkey_grid(model, tok, text: str, lengths, depths, trials: int = 1, seed: int = 0, progress: bool = True,
                 chat: bool = False) -> dict:
    """Run the depth x length grid.

    Args:
        model: a causal LM (patched or not); decoding uses ``model.generate``.
        tok: its tokenizer.
        text: filler text.
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1].
        trials: passkeys per cell.
        chat: use the tokenizer's chat template (:func:`prompt_parts`).

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
    starts = sentence_starts(tok, filler)
    grid, answers = {}, []
    cells = [(L, d, t) for L in lengths for d in depths for t in range(trials)]
    for L, d, t in tqdm(cells, desc="passkey", disable=not progress, leave=False):
        key, offset = trial_spec(seed, L, d, t, room)
        ids = build_prompt(tok, filler, L, d, key, offset, chat, starts).unsqueeze(0).to(device)  # (1, L)
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


def depth_key(depth: float) -> str:
    """Column name of a needle depth: ``depth_25`` for 0.25."""
    return f"depth_{round(100 * float(depth))}"


@register("eval", "passkey")
def evaluate(cfg, model, tok, splits, method) -> dict:
    """The ``eval=passkey`` entry point (the model is already patched by :func:`kvbench.run.evaluate`).

    Returns ``passkey_acc`` (all trials), ``passkey: {length: {"acc", "depth_<percent>": acc}}`` (one
    row per context length: the depth x length grid, a W&B table) and ``passkey_info`` (every answer).
    """
    e = cfg.eval
    lengths = sorted({int(x) for x in e.passkey_lengths})
    limit = method.info.max_context
    too_long = [L for L in lengths if L > limit]
    if too_long:
        raise UserError(f"eval.passkey_lengths {too_long} exceed {method.info.name}'s context of {limit} tokens")
    res = passkey_grid(model, tok, splits.joined("eval"), lengths, list(e.passkey_depths), e.passkey_trials, cfg.seed, cfg.logging.progress)
    table = {}
    for L, acc in res["by_length"].items():
        table[L] = {"acc": acc, **{depth_key(d): v for d, v in res["grid"][L].items()}}
        row = " ".join(f"{float(d):.2f}:{v:.2f}" for d, v in res["grid"][L].items())
        print(f"kvbench | passkey @{L}: acc {acc:.3f} (by depth {row})")
    info = {"lengths": lengths, "depths": [float(d) for d in e.passkey_depths], "trials": e.passkey_trials, "answers": res["answers"]}
    return {"passkey_acc": res["acc"], "passkey": table, "passkey_info": info}
