"""The interception layer: exact fp16, correct masks, generate() through the quantizing cache."""

from __future__ import annotations

import torch

from conftest import tokens
from kvbench.cache import QuantizingCache, patched
from kvbench.model import apply_rope, invert_rope


def _method(compose, info, *overrides):
    from kvbench.run import build_method

    return build_method(compose(["model=tiny-llama", *overrides]), info)


def test_fp16_equals_unpatched_model(embedded_model, compose):
    model, tok, info = embedded_model
    ids = tokens(tok)[:, :64]
    with torch.no_grad():
        ref = model(ids).logits
        with patched(model, _method(compose, info, "method=fp16")):
            out = model(ids).logits
    assert torch.equal(out, ref)


def test_16_bit_through_the_cache_is_exact(tiny_model, compose):
    """The cache path itself (not just the identity shortcut) reproduces the model bit for bit."""
    model, tok, info = tiny_model
    ids = tokens(tok)
    with torch.no_grad():
        ref = model(ids).logits
        with patched(model, _method(compose, info, "method=uniform", "kv.bits=16")):
            out = model(ids)
    assert isinstance(out.past_key_values, QuantizingCache)
    assert torch.equal(out.logits, ref)


def test_rope_inverse_roundtrip():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)
    theta = torch.randn(2, 5, 4)
    cos, sin = torch.cos(theta).repeat(1, 1, 2), torch.sin(theta).repeat(1, 1, 2)
    torch.testing.assert_close(invert_rope(apply_rope(x, cos, sin), cos, sin), x, atol=1e-6, rtol=0)


def test_padding_mask_is_respected(tiny_model, compose):
    """A left-padded batch gives the same logits as each sequence alone (per-token quantization)."""
    model, tok, info = tiny_model
    method = _method(compose, info, "method=uniform", "kv.bits=4")
    a, b = tokens(tok)[0, :20], tokens(tok, "Hello world, how are you today?")[0]
    pad = torch.full((20 - b.numel(),), tok.pad_token_id)
    batch = torch.stack([a, torch.cat([pad, b])])
    mask = torch.stack([torch.ones(20), torch.cat([torch.zeros(pad.numel()), torch.ones(b.numel())])]).long()
    with torch.no_grad(), patched(model, method):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # real tokens keep their positions (RoPE)
        both = model(batch, attention_mask=mask, position_ids=positions).logits
        alone_a = model(a[None]).logits
        alone_b = model(b[None]).logits
    torch.testing.assert_close(both[0], alone_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1, pad.numel():], alone_b[0], atol=1e-4, rtol=1e-4)


def test_causal_mask_under_quantization(tiny_model, compose):
    """Changing the last token must not change any earlier logits."""
    model, tok, info = tiny_model
    method = _method(compose, info, "method=uniform", "kv.bits=2")
    ids = tokens(tok)[:, :32]
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % model.config.vocab_size
    with torch.no_grad(), patched(model, method):
        x, y = model(ids).logits, model(other).logits
    torch.testing.assert_close(x[0, :-1], y[0, :-1], atol=0, rtol=0)
    assert not torch.equal(x[0, -1], y[0, -1])


def test_generate_stores_quantized_kv(tiny_model, compose):
    model, tok, info = tiny_model
    method = _method(compose, info, "method=uniform", "kv.bits=2", "method.sink_tokens=2", "method.recent_window=4")
    ids = tokens(tok)[:, :24]
    with torch.no_grad(), patched(model, method):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, QuantizingCache)
    layer = cache.layers[0]
    n = layer.keys.shape[-2]
    assert n == 24 + 6 - 1  # the last generated token is never fed back
    assert layer.n_final == n - 4  # recent window of 4 still in full precision
    # a 2-bit per-token quantized key has at most 4 distinct values per (head, token)
    quantized = layer.keys[0, :, 2 : layer.n_final]  # (H_kv, T_q, D)
    distinct = [t.unique().numel() for t in quantized.reshape(-1, quantized.shape[-1])]
    assert max(distinct) <= 4
    assert layer.keys[0, :, -1].unique().numel() > 4  # the recent window is untouched


def test_pre_rope_path_at_16_bits_is_close(tiny_model):
    """Rotating back, (not) quantizing and rotating again reproduces the logits."""
    from kvbench.method import KVMethod, MethodConfig

    model, tok, info = tiny_model

    class PreRopeIdentity(KVMethod):
        pre_rope = True

    ids = tokens(tok)
    with torch.no_grad():
        ref = model(ids).logits
        with patched(model, PreRopeIdentity(MethodConfig(name="x"), None, info)):
            out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
