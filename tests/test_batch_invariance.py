"""Batches do not change scores: every method gives each document the same log-likelihoods and
generations at batch size 1 and 4, with lm-eval's padding (right for log-likelihoods, left for
generation) kept out of block statistics, recent windows, sink tokens and token groups.

Tolerance: float32 batched matmuls round differently from single-row ones. Measured here (tiny model,
CPU): at most 4.8e-7 on any logit, for fp16 and every quantized method alike; :data:`ATOL` is 20x that,
and 4 orders of magnitude below what padding inside the statistics did before it was masked out (0.2 on
KIVI-2 logits; with the padding spans switched off 17 of the 21 scoring/generation cases fail)."""

from __future__ import annotations

import pytest
import torch

from kvbench.cache import patched
from conftest import write_generation_task
from kvbench.run import build_method

ATOL = 1e-5
TEXTS = [
    "The quick brown fox jumps over the lazy dog and keeps on running until it is far away from home.",
    "Hello world, how are you today?",
    "A short one.",
    "In the beginning there was a long sentence that went on for a while, with commas, clauses and more words.",
]
METHODS = [
    ["method=fp16"],
    ["method=uniform", "kv.bits=2", "method.sink_tokens=1", "method.recent_window=4"],
    ["method=uniform", "kv.bits=2", "method.key_axis=channel", "method.key_block=4"],
    ["method=kivi", "kv.bits=2", "method.key_block=4", "method.value_group_size=8", "method.recent_window=4"],
    ["method=kvquant", "kv.bits=2", "method.recent_window=4"],
    ["method=qokv", "kv.bits=2"],
    ["method=qokv", "kv.bits=2", "method.group_thresholds=[2.0,0.5]", "method.top_recent=2", "method.recent_window=2"],
]


def _id(overrides):
    return ",".join(o.split("=", 1)[1] if o.startswith("method=") else o.removeprefix("method.") for o in overrides)


@pytest.fixture
def method_of(tiny_model, wiki_splits, compose, tmp_path):
    def build(overrides):
        model, tok, info = tiny_model
        cfg = compose(["model=tiny-llama", "calib.num_samples=2", "calib.seqlen=64", f"calib.cache_dir={tmp_path}",
                       *overrides])
        method = build_method(cfg, info)
        if method.calibration_needs():
            from kvbench.calibration import prepare

            prepare(cfg, model, tok, wiki_splits, method)
        return method

    return build


def _ids(tok):
    return [tok(t, return_tensors="pt").input_ids[0] for t in TEXTS]  # lengths differ: the batch pads


@pytest.mark.parametrize("overrides", METHODS, ids=map(_id, METHODS))
def test_right_padded_scoring_equals_each_document_alone(overrides, tiny_model, method_of):
    """lm-eval's log-likelihood batch: right-padded with token 0, no mask from lm-eval (the harness adds it)."""
    from kvbench.eval.harness import trailing_padding_mask

    model, tok, info = tiny_model
    method = method_of(overrides)
    ids = _ids(tok)
    T = max(x.numel() for x in ids)
    batch = torch.stack([torch.cat([x, x.new_zeros(T - x.numel())]) for x in ids])  # as lm-eval's pad_and_concat
    with torch.no_grad(), patched(model, method):
        alone = [model(x[None]).logits[0] for x in ids]
        together = model(batch, attention_mask=trailing_padding_mask(batch)).logits
    diff = max((together[i, : x.numel()] - alone[i]).abs().max().item() for i, x in enumerate(ids))
    assert diff < ATOL, f"max |logit batch 4 - batch 1| = {diff:.2e}"


@pytest.mark.parametrize("prefill", ["quantized", "full"])
@pytest.mark.parametrize("overrides", METHODS, ids=map(_id, METHODS))
def test_left_padded_generation_equals_each_prompt_alone(overrides, prefill, tiny_model, method_of):
    """generate() on a left-padded batch (as lm-eval's generate_until): every step's logits of every row
    equal that prompt generated alone."""
    model, tok, info = tiny_model
    method = method_of(overrides)
    ids = _ids(tok)
    T = max(x.numel() for x in ids)
    pad = [T - x.numel() for x in ids]
    batch = torch.stack([torch.cat([x.new_full((p,), tok.pad_token_id), x]) for x, p in zip(ids, pad)])
    mask = torch.stack([torch.cat([torch.zeros(p), torch.ones(x.numel())]) for x, p in zip(ids, pad)]).long()
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=tok.pad_token_id)
    with torch.no_grad(), patched(model, method, prefill=prefill):
        alone = [model.generate(x[None], attention_mask=torch.ones(1, x.numel(), dtype=torch.long), **kw) for x in ids]
        together = model.generate(batch, attention_mask=mask, **kw)
    for i, a in enumerate(alone):
        assert torch.equal(together.sequences[i, T:], a.sequences[0, ids[i].numel():]), i
        diff = max((s[i] - t[0]).abs().max().item() for s, t in zip(together.logits, a.logits))
        assert diff < ATOL, f"row {i}: max |logit batch 4 - batch 1| = {diff:.2e}"


@pytest.mark.parametrize("overrides", [METHODS[3], METHODS[5]], ids=map(_id, [METHODS[3], METHODS[5]]))
def test_lm_eval_batch_size_does_not_change_per_document_results(overrides, tiny_model, method_of, tmp_path):
    """Through lm-eval itself: PIQA log-likelihoods (right padding) and a generate_until task (left
    padding) per document at batch size 1 and 4."""
    from kvbench.eval.harness import run_tasks

    write_generation_task(tmp_path, "kvbench_batch_probe", TEXTS, [" x"] * len(TEXTS), max_gen_toks=6)
    model, tok, info = tiny_model
    method = method_of(overrides)
    res = {}
    for bs in (1, 4):
        with patched(model, method):
            r = run_tasks(model, tok, ["piqa", "kvbench_batch_probe"], limit=8, batch_size=bs, include_path=[tmp_path],
                          log_samples=True)
        samples = r["samples"]
        lls = {s["doc_id"]: [float(x[0][0]) for x in s["resps"]] for s in samples["piqa"]}
        gens = {s["doc_id"]: s["resps"][0][0] for s in samples["kvbench_batch_probe"]}
        res[bs] = lls, gens
    (ll1, gen1), (ll4, gen4) = res[1], res[4]
    assert ll1.keys() == ll4.keys() and len(ll1) == 8
    diff = max(abs(a - b) for d in ll1 for a, b in zip(ll1[d], ll4[d]))
    assert diff < ATOL, f"max |loglikelihood batch 4 - batch 1| = {diff:.2e}"
    assert gen1 == gen4 and len(gen1) == len(TEXTS)


def test_padding_spans_left_right_and_interior_zeros():
    from kvbench.cache.hooks import padding_spans

    assert padding_spans(torch.ones(2, 5, dtype=torch.long)) is None
    assert padding_spans(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])) == [(2, 5), (0, 4)]
    with pytest.warns(UserWarning, match="zeros inside a sequence"):  # generate() masks a pad id in the prompt
        assert padding_spans(torch.tensor([[1, 0, 1, 1, 1]])) is None
