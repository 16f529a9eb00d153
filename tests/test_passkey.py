"""The synthetic passkey task: exact prompt lengths, needle placement, seeding, scoring, the grid."""

from __future__ import annotations

import pytest
import torch

FILLER = "The river flows past the old mill and the village green. " * 400


def test_prompt_has_exact_length_and_needle_at_depth(tiny_model):
    from kvbench.eval.passkey import NEEDLE, build_prompt, filler_ids

    _, tok, _ = tiny_model
    filler = filler_ids(tok, FILLER, 600)
    needle = tok(NEEDLE.format(key="12345"), add_special_tokens=False).input_ids
    starts = []
    for depth in (0.0, 0.5, 1.0):
        ids = build_prompt(tok, filler, 512, depth, "12345", offset=7)
        assert ids.shape == (512,)
        text = tok.decode(ids)
        assert text.count("12345") == 2 and text.rstrip().endswith("The pass key is")
        seq = ids.tolist()
        starts.append(next(i for i in range(len(seq)) if seq[i:i + len(needle)] == needle))
    assert starts[0] < starts[1] < starts[2]
    assert abs(starts[1] - (starts[0] + starts[2]) / 2) <= 2  # the middle depth is half way through the filler


def test_filler_is_cut_between_sentences(tiny_model):
    from kvbench.eval.passkey import INSTRUCTION, build_prompt, filler_ids, sentence_starts

    _, tok, _ = tiny_model
    filler = filler_ids(tok, FILLER, 600)
    starts = sentence_starts(tok, filler)
    assert 0 < int(starts.sum()) < filler.numel()
    for depth in (0.0, 0.4, 1.0):
        text = tok.decode(build_prompt(tok, filler, 300, depth, "12345", offset=3, starts=starts))
        assert text.startswith(INSTRUCTION + " The ")  # the filler (or needle) begins a sentence
        if depth == 0.4:
            assert "green. The pass key is 12345. Remember it. 12345 is the pass key. The river" in text


def test_trials_are_seeded_and_independent_of_order():
    from kvbench.eval.passkey import trial_spec

    a = trial_spec(0, 2048, 0.5, 1, room=10_000)
    assert a == trial_spec(0, 2048, 0.5, 1, room=10_000)
    assert a != trial_spec(1, 2048, 0.5, 1, room=10_000)
    key, offset = a
    assert len(key) == 5 and key.isdigit() and 0 <= offset <= 10_000


def test_exact_match():
    from kvbench.eval.passkey import answer_correct

    assert answer_correct(" 47657. Remember it", "47657")
    assert not answer_correct(" 4765", "47657")
    assert not answer_correct(" 476571", "47657")
    assert not answer_correct(" a key that opens doors", "47657")


def test_grid_on_tiny_model_goes_through_quantizing_cache(tiny_model, compose):
    """The grid covers every (length, depth); decoding with int2 uses the quantizing cache."""
    from kvbench.eval.passkey import passkey_grid
    from kvbench.cache import QuantizingCache, patched
    from kvbench.run import build_method

    model, tok, info = tiny_model
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(type(out.past_key_values)))
    try:
        with patched(model, build_method(compose(["model=tiny-llama", "method=uniform", "kv.bits=2"]), info)):
            res = passkey_grid(model, tok, FILLER, [128, 256], [0.0, 1.0], trials=2, seed=3, progress=False)
    finally:
        handle.remove()
    assert set(seen) == {QuantizingCache}
    assert set(res["grid"]) == {"128", "256"} and set(res["grid"]["128"]) == {"0.0", "1.0"}
    assert len(res["answers"]) == 8 and res["acc"] == pytest.approx(sum(a["correct"] for a in res["answers"]) / 8)
    again = passkey_grid(model, tok, FILLER, [128, 256], [0.0, 1.0], trials=2, seed=3, progress=False)
    assert [a["key"] for a in again["answers"]] == [a["key"] for a in res["answers"]]


def test_lengths_beyond_context_are_an_error(tiny_model, compose):
    from kvbench.errors import UserError
    from kvbench.eval import passkey
    from kvbench.run import build_method

    model, tok, info = tiny_model
    cfg = compose(["model=tiny-llama", "eval=passkey", "eval.passkey_lengths=[512,16384]"])
    with pytest.raises(UserError, match=r"\[16384\] exceed tiny-llama's context of 8192"):
        passkey.evaluate(cfg, model, tok, None, build_method(cfg, info))
    with pytest.raises(UserError, match="depths must lie in"):
        passkey.passkey_grid(model, tok, FILLER, [128], [1.5])


@pytest.mark.slow
def test_golden_fp16_embedded_2k(embedded_model, wiki_splits):
    """SmolLM2 with an fp16 cache at 2048 tokens gives the golden answers (README: passkey section)."""
    import json
    import sys
    from pathlib import Path

    golden_dir = Path(__file__).parent / "golden"  # made by tests/golden/make_passkey.py
    sys.path.insert(0, str(golden_dir))
    from make_passkey import golden

    ref = json.loads((golden_dir / "passkey.json").read_text())
    model, tok, _ = embedded_model
    got = golden(model, tok, wiki_splits.joined("eval"))
    assert [(a["key"], a["correct"]) for a in got["answers"]] == [(a["key"], a["correct"]) for a in ref["answers"]]
    assert got["acc"] == ref["acc"]
