"""Error bars: the block bootstrap of kvbench.stats against independent computations, and the per-block
NLLs of kvbench.eval.ppl.perplexity against HF's own loss.

References computed here: a hand-written percentile bootstrap over the same resampled blocks, the
analytic (delta-method) normal interval of a ratio estimator on a large synthetic sample, and
``model(x, labels=x).loss`` per window.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvbench import stats
from kvbench.eval import ppl as ppl_mod

Z95 = 1.959963984540054


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), by hand."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (pos - lo) * (sorted_vals[hi] - sorted_vals[lo])


def _synthetic(n: int, seed: int):
    """Per-block NLL sums of blocks of 100-128 tokens (mean NLL ~2.6 nats/token) and of a correlated second run."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(100, 129, size=n).astype(float)
    per_tok = rng.gamma(4.0, 0.65, size=n)  # block-level difficulty varies a lot
    nll = per_tok * tokens
    nll2 = nll + tokens * (math.log(1.02) + 0.02 * rng.standard_normal(n))  # a 2 % worse run, same text
    return nll, nll2, tokens


def _ratio_normal(num: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
    """Estimate and standard error of sum(num) / sum(tokens) (delta method, linearised ratio)."""
    r = num.sum() / tokens.sum()
    resid = num - r * tokens
    se = math.sqrt(resid.var(ddof=1) / len(num)) / tokens.mean()
    return r, se


def test_ppl_ci_equals_hand_written_percentile_bootstrap():
    nll, _, tokens = _synthetic(40, seed=1)
    idx = stats.resample_indices(len(nll), 500, seed=7)
    boot = sorted(math.exp(sum(nll[i] for i in row) / sum(tokens[i] for i in row)) for row in idx.tolist())
    want = (_percentile(boot, 0.025), _percentile(boot, 0.975))
    got = stats.ppl_ci(nll, tokens, resamples=500, seed=7)
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] < math.exp(nll.sum() / tokens.sum()) < got[1]
    assert stats.ppl_ci(nll, tokens, resamples=500, seed=7) == got  # seeded: reproducible
    assert stats.ppl_ci(nll, tokens, resamples=500, seed=8) != got


def test_paired_delta_equals_hand_written_bootstrap():
    nll, nll2, tokens = _synthetic(30, seed=2)
    idx = stats.resample_indices(len(nll), 400, seed=3).tolist()
    pct, diff = [], []
    for row in idx:
        t = sum(tokens[i] for i in row)
        a, b = sum(nll[i] for i in row) / t, sum(nll2[i] for i in row) / t
        pct.append(100 * (math.exp(b - a) - 1))
        diff.append(math.exp(b) - math.exp(a))
    for mode, vals in (("pct", sorted(pct)), ("diff", sorted(diff))):
        got = stats.paired_delta_ci(nll, nll2, tokens, mode=mode, resamples=400, seed=3)
        assert got == pytest.approx((_percentile(vals, 0.025), _percentile(vals, 0.975)), rel=1e-12), mode


def test_ppl_ci_agrees_with_the_normal_interval_on_a_large_sample():
    nll, _, tokens = _synthetic(4000, seed=4)
    r, se = _ratio_normal(nll, tokens)
    want = (math.exp(r - Z95 * se), math.exp(r + Z95 * se))
    lo, hi = stats.ppl_ci(nll, tokens)
    half = (want[1] - want[0]) / 2
    assert abs(lo - want[0]) < 0.08 * half and abs(hi - want[1]) < 0.08 * half, ((lo, hi), want)


def test_paired_interval_agrees_with_the_normal_interval_and_is_narrower():
    nll, nll2, tokens = _synthetic(4000, seed=5)
    d, se = _ratio_normal(nll2 - nll, tokens)
    want = (100 * math.expm1(d - Z95 * se), 100 * math.expm1(d + Z95 * se))
    lo, hi = stats.paired_delta_ci(nll, nll2, tokens)
    half = (want[1] - want[0]) / 2
    assert abs(lo - want[0]) < 0.08 * half and abs(hi - want[1]) < 0.08 * half, ((lo, hi), want)
    assert lo < 2.0 < hi and hi - lo < 0.2  # the 2 % shift, resolved to a tenth of a percent
    a, b = stats.ppl_ci(nll, tokens), stats.ppl_ci(nll2, tokens)
    assert a[1] > b[0]  # unpaired intervals overlap: the shared text variation hides the difference


def test_bad_blocks_raise():
    with pytest.raises(ValueError):
        stats.ppl_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 blocks"):
        stats.ppl_ci([3.0], [2.0])
    with pytest.raises(ValueError):
        stats.paired_delta_ci([1.0], [1.0], [1.0], mode="ratio")


def test_perplexity_blocks_match_hf_loss(tiny_model):
    model, tok, info = tiny_model
    seqlen, block = 300, 128
    ids = torch.randint(0, model.config.vocab_size, (3 * seqlen + 17,), generator=torch.Generator().manual_seed(0))
    p = ppl_mod.perplexity(model, ids, seqlen, progress=False, block=block)
    b = p["blocks"]
    assert b["size"] == block and b["tokens"] == [128, 128, 43] * 3  # 299 predictions per window, never crossing
    with torch.no_grad():
        window_nll = [model(w[None], labels=w[None]).loss.item() * (seqlen - 1)
                      for w in ids[: 3 * seqlen].view(3, seqlen)]
    got = [sum(b["nll"][3 * k: 3 * k + 3]) for k in range(3)]
    assert got == pytest.approx(window_nll, rel=1e-5)
    assert p["tokens"] == 3 * (seqlen - 1)
    assert p["ppl"] == pytest.approx(math.exp(sum(window_nll) / p["tokens"]), rel=1e-5)
    assert p["ci95"] == list(stats.ppl_ci(b["nll"], b["tokens"])) and p["ci95"][0] < p["ppl"] < p["ci95"][1]
    again = ppl_mod.perplexity(model, ids, seqlen, max_windows=2, progress=False, block=block)
    assert again["blocks"]["ids"] != b["ids"] and again["blocks"]["nll"] == pytest.approx(b["nll"][:6], rel=1e-6)
    one = ppl_mod.perplexity(model, ids, 64, max_windows=1, progress=False, block=block)
    assert one["blocks"]["tokens"] == [63] and one["ci95"] is None  # one block: no bootstrap


@pytest.mark.parametrize("seqlen,max_windows", [(0, None), (1, 4), (-3, None), (512, 0), (512, -1)])
def test_bad_window_settings_raise_at_once(seqlen, max_windows):
    def tok(*a, **k):
        raise AssertionError("tokenized before the settings were checked")

    cfg = SimpleNamespace(eval=SimpleNamespace(seqlen=seqlen, max_windows=max_windows),
                          logging=SimpleNamespace(progress=False))
    with pytest.raises(ValueError, match="eval.(seqlen|max_windows) must be"):
        ppl_mod.evaluate(cfg, None, tok, SimpleNamespace(eval=["text"]), None)
    with pytest.raises(ValueError, match="must be"):
        ppl_mod.windows(torch.arange(100), seqlen, max_windows)


def test_tokenize_prefix_terminates(tiny_model):
    _, tok, _ = tiny_model
    with pytest.raises(ValueError, match="n_tokens must be >= 1"):
        ppl_mod.tokenize_prefix(tok, ["a b c"] * 3, 0)
    ids = ppl_mod.tokenize_prefix(tok, ["", "", "one two three four"], 2)  # empty first documents: still grows
    assert ids.numel() > 2
