"""``kv.prefill``: the prompt attends to quantized K/V (``quantized``) or in full precision with the cache
quantized after the prefill (``full``, KIVI's deployment setting); decode steps read the quantized cache in
both settings, for every method and both backends."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import tokens
from kvbench.cache import patched
from kvbench.run import build_method

# KIVI-2 with 8-token key blocks and no fp16 window: a 24-token prompt is three whole key blocks, and the
# first generated token stays in full precision (its key block is not full)
KIVI = ["method=kivi", "kv.bits=2", "method.key_block=8", "method.value_group_size=8", "method.recent_window=0"]
PROMPT = 24


def _kivi_reference(x: torch.Tensor, which: str) -> torch.Tensor:
    """Hand-written KIVI-2 of ``x (B, H, T, D)``: keys per channel over 8-token blocks, values per token
    in groups of 8 channels; min-max asymmetric, round to nearest."""
    B, H, T, D = x.shape
    g = x.view(B, H, T // 8, 8, D) if which == "k" else x.view(B, H, T, D // 8, 8)
    axis = 3 if which == "k" else 4
    lo, hi = g.amin(axis, keepdim=True), g.amax(axis, keepdim=True)
    scale = ((hi - lo) / 3).clamp_min(1e-8)
    return (torch.round((g - lo) / scale).clamp(0, 3) * scale + lo).view(B, H, T, D)


def _generate(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _decode_reference(model, prompt_kv, token):
    """Logits of one decode step of the plain model over a DynamicCache holding ``prompt_kv``."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(prompt_kv):
        cache.update(k, v, i)
    return model(token, past_key_values=cache).logits[:, -1]


@pytest.mark.parametrize("backend", ["simulated", "kernel"])
def test_full_prefill_is_fp16_then_decode_reads_the_quantized_prompt(tiny_model, compose, backend):
    model, tok, info = tiny_model
    cfg = compose(["model=tiny-llama", *KIVI, f"kv.backend={backend}", "kv.kernel.impl=reference"])
    method = build_method(cfg, info)
    ids = tokens(tok)[:, :PROMPT]
    with torch.no_grad():
        plain = _generate(model, ids, 1)  # the unpatched HF model
        fp = model(ids, use_cache=True).past_key_values  # full-precision K/V of every layer
        gen = {}
        for prefill in ("quantized", "full"):
            with patched(model, method, backend, cfg.kv.kernel, prefill):
                gen[prefill] = _generate(model, ids, 2)
        # full: every layer's prompt K/V are the fp16 model's, so the cache holds their hand-quantized copy
        ref_kv = [(_kivi_reference(lay.keys, "k"), _kivi_reference(lay.values, "v")) for lay in fp.layers]
        ref_step = _decode_reference(model, ref_kv, gen["full"].sequences[:, PROMPT:PROMPT + 1])
    assert torch.equal(gen["full"].logits[0], plain.logits[0])
    d = (gen["quantized"].logits[0] - plain.logits[0]).abs().max()
    assert d > 1e-3, f"kv.prefill=quantized left the prefill logits unchanged ({d:.2e})"
    # measured: simulated 0 (the reference's float operations), kernel 1.4e-4 (fp16 scales and zero points);
    # a decode step over unquantized K/V is 0.097 away
    tol = 1e-5 if backend == "simulated" else 2e-3
    err = (gen["full"].logits[1] - ref_step).abs().max()
    far = (plain.logits[0] - ref_step).abs().max()  # how far a decode step over unquantized K/V would be
    assert err <= tol < far, f"decode step vs hand-quantized prompt: max |d| {err:.2e} (unquantized: {far:.2e})"


def test_quantized_prefill_decode_reads_the_stored_quantized_prompt(tiny_model, compose):
    """With ``quantized``, layer 0 (whose input does not depend on attention) stores the hand-quantized
    fp16 K/V, and the decode step attends to what the cache stores for the prompt."""
    model, tok, info = tiny_model
    method = build_method(compose(["model=tiny-llama", *KIVI]), info)
    ids = tokens(tok)[:, :PROMPT]
    with torch.no_grad():
        fp = model(ids, use_cache=True).past_key_values
        with patched(model, method, prefill="quantized"):
            gen = _generate(model, ids, 2)
        stored = [(lay.keys[..., :PROMPT, :], lay.values[..., :PROMPT, :]) for lay in gen.past_key_values.layers]
        ref_step = _decode_reference(model, stored, gen.sequences[:, PROMPT:PROMPT + 1])
    layer0 = fp.layers[0]
    torch.testing.assert_close(stored[0][0], _kivi_reference(layer0.keys, "k"), atol=1e-6, rtol=0)
    torch.testing.assert_close(stored[0][1], _kivi_reference(layer0.values, "v"), atol=1e-6, rtol=0)
    torch.testing.assert_close(gen.logits[1], ref_step, atol=1e-5, rtol=0)


METHODS = [  # (method overrides, kernel backend overrides or None: identity, no cache to pack)
    (["method=fp16"], None),
    (["method=uniform", "kv.bits=2"], []),
    (["method=kivi", "kv.bits=2", "method.key_block=8", "method.value_group_size=8", "method.recent_window=8"], []),
    (["method=kvquant", "kv.bits=2"], []),
    (["method=qokv", "kv.bits=2"], ["method.value_bit_offsets=[2,0,0]"]),  # 3-bit codes need head_dim % 32 == 0
]


@pytest.mark.parametrize("overrides, kernel", METHODS, ids=[m[0][0] for m in METHODS])
@pytest.mark.parametrize("backend", ["simulated", "kernel"])
def test_every_method_generates_in_both_settings(overrides, kernel, backend, tiny_model, wiki_splits, compose, tmp_path):
    """``full``: the first generated token's logits are the plain model's; ``quantized``: they move
    (except fp16); later decode steps differ from fp16 in both settings."""
    if backend == "kernel" and kernel is None:
        pytest.skip("fp16 installs no cache")
    model, tok, info = tiny_model
    cfg = compose(["model=tiny-llama", "calib.num_samples=2", "calib.seqlen=64", f"calib.cache_dir={tmp_path}",
                   *overrides, *(kernel or []), f"kv.backend={backend}", "kv.kernel.impl=reference"])
    method = build_method(cfg, info)
    if method.calibration_needs():
        from kvbench.calibration import prepare

        prepare(cfg, model, tok, wiki_splits, method)
    ids = tokens(tok)[:, :PROMPT]
    with torch.no_grad():
        plain = _generate(model, ids, 4)
        gen = {}
        for prefill in ("quantized", "full"):
            with patched(model, method, backend, cfg.kv.kernel, prefill):
                gen[prefill] = _generate(model, ids, 4)
    assert torch.equal(gen["full"].logits[0], plain.logits[0])
    for prefill, out in gen.items():
        assert out.sequences.shape == (1, PROMPT + 4)
        if method.is_identity:
            assert all(torch.equal(a, b) for a, b in zip(out.logits, plain.logits))
            continue
        # a decode step over a different prompt token would make this vacuous: feed the same tokens
        steps = [(a - b).abs().max() for a, b in zip(out.logits, plain.logits)]
        if prefill == "quantized":
            assert steps[0] > 1e-4, f"{prefill}: prefill logits unchanged"
        if torch.equal(out.sequences, plain.sequences):
            assert max(steps[1:]) > 1e-4, f"{prefill}: decode steps read unquantized K/V ({steps})"


def test_prefill_is_in_the_run_hash(compose):
    """``kv.prefill=full`` is a different run; ``quantized`` (the default) keeps the hash of runs made
    before the option existed (the resolved config without the key)."""
    from kvbench.tracking.store import config_hash, result_config

    fingerprints = {"data": "d", "model": "m"}
    quant, full = (compose(["model=tiny-llama", "method=kivi", "eval=passkey", f"kv.prefill={p}"]) for p in ("quantized", "full"))
    assert result_config(full)["kv"]["prefill"] == "full"
    assert "prefill" not in result_config(quant)["kv"]
    assert config_hash(quant, fingerprints) != config_hash(full, fingerprints)
    default = compose(["model=tiny-llama", "method=kivi", "eval=passkey"])
    assert config_hash(default, fingerprints) == config_hash(quant, fingerprints)
