"""Perplexity of the embedded model: golden fp16 value and the expected ordering of bit widths.

Golden numbers: tests/golden/ppl.json, made by tests/golden/make_ppl.py (same settings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

GOLDEN = json.loads((Path(__file__).parent / "golden" / "ppl.json").read_text())


@pytest.fixture(scope="module")
def measured(embedded_model, wiki_splits):
    from golden.make_ppl import measure

    model, tok, info = embedded_model
    return measure(model, tok, info, wiki_splits)


def test_fp16_matches_golden(measured):
    assert measured["fp16"] == pytest.approx(GOLDEN["ppl"]["fp16"], abs=1e-3)


def test_quantized_match_golden(measured):
    for name, value in GOLDEN["ppl"].items():
        assert measured[name] == pytest.approx(value, abs=1e-2), name


def test_bit_width_ordering(measured):
    assert measured["int2"] > measured["int3"] > measured["int4"] > measured["fp16"]
    assert abs(measured["int8"] / measured["fp16"] - 1) < 0.005


def test_windows_are_non_overlapping():
    from kvbench.eval.ppl import windows

    w = windows(torch.arange(10), 3, None)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(torch.arange(10), 3, 2).shape == (2, 3)
