"""The simulated backend's fused GPU kernels (:mod:`kvbench.kernels.triton.simulated`) against their PyTorch
twins and against hand-written math, under TRITON_INTERPRET=1 on a CPU (on a GPU the methods pick them for
CUDA tensors; here the tests force them with ``fused_simulated``)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import tokens  # noqa: E402

pytest.importorskip("triton")


def _hand_affine(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric uniform quantize-dequantize, one range per ``group`` channels, in plain arithmetic."""
    xg = x.reshape(*x.shape[:-1], -1, group)
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    step = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    return (torch.round((xg - lo) / step).clamp(0, 2**bits - 1) * step + lo).reshape(x.shape)


def test_uniform_and_per_token_widths_equal_hand_written_quantization():
    from kvbench.kernels.triton.simulated import fake_quant_tokens

    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 32)
    torch.testing.assert_close(fake_quant_tokens(x, bits=3, group=8), _hand_affine(x, 3, 8), atol=1e-6, rtol=0)
    bits = torch.randint(2, 6, (2, 7))
    shift, scale = torch.randn(3, 32), torch.rand(3, 32) + 0.5
    want = torch.empty_like(x)
    for b in range(2):
        for t in range(7):
            y = (x[b, :, t] - shift) / scale
            want[b, :, t] = _hand_affine(y, int(bits[b, t]), 16) * scale + shift
    got = fake_quant_tokens(x, token_bits=bits, group=16, shift=shift, scale=scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_per_token_outliers_are_the_extremes_over_all_heads_and_are_counted():
    from kvbench.kernels.triton.simulated import fake_quant_tokens

    torch.manual_seed(1)
    x = torch.randn(1, 2, 5, 16)
    count = torch.zeros((), dtype=torch.int64)
    out = fake_quant_tokens(x, group=16, codebook=torch.linspace(-1, 1, 4), outliers_per_side=2, outlier_count=count)
    per_token = x.transpose(1, 2).reshape(1, 5, 32)
    kept = (out == x).transpose(1, 2).reshape(1, 5, 32)
    for t in range(5):  # the 2 largest and 2 smallest of each token's 32 values come back exactly
        ext = torch.cat([per_token[0, t].topk(2).indices, per_token[0, t].topk(2, largest=False).indices])
        assert kept[0, t, ext].all()
    assert int(count) == 5 * 4


@pytest.mark.parametrize("overrides", [
    [],  # KVQuant's defaults: pre-RoPE per-channel keys with thresholds, NUQ, value outliers, a sink token
    ["method.key_axis=token", "method.nuq=false", "kv.bits=3"],
    ["method.outlier_frac=0", "kv.bits=2"],
], ids=["defaults", "token-keys-uniform", "no-outliers"])
def test_kvquant_fused_equals_pytorch_path(tiny_model, wiki_splits, compose, tmp_path, monkeypatch, overrides):
    from kvbench import kernels
    from kvbench.cache import patched
    from kvbench.calibration import prepare
    from kvbench.run import build_method

    model, tok, info = tiny_model
    cfg = compose(["method=kvquant", "model=tiny-llama", "calib.num_samples=2", "calib.seqlen=64",
                   f"calib.cache_dir={tmp_path}", *overrides])
    ids = tokens(tok)[:, :40]
    out, counts = {}, {}
    for fused in (False, True):
        method = build_method(cfg, info)
        if method.calibration_needs():
            prepare(cfg, model, tok, wiki_splits, method)
        monkeypatch.setattr(kernels, "fused_simulated", lambda x, group=None, f=fused: f)
        with torch.no_grad(), patched(model, method):
            out[fused] = model(ids).logits
        counts[fused] = (float(method.outlier_count["k"]), float(method.outlier_count["v"]), dict(method.element_count))
    torch.testing.assert_close(out[True], out[False], atol=2e-5, rtol=0)
    assert counts[True] == counts[False]


def test_qokv_fused_equals_pytorch_path(tiny_model, wiki_splits, compose, tmp_path, monkeypatch):
    """QoKV's defaults: online grouping (received attention), channel shift and scales, 3 widths per token."""
    from kvbench import kernels
    from kvbench.cache import patched
    from kvbench.calibration import prepare
    from kvbench.run import build_method

    model, tok, info = tiny_model
    cfg = compose(["method=qokv", "model=tiny-llama", "calib.num_samples=2", "calib.seqlen=64",
                   f"calib.cache_dir={tmp_path}"])
    ids = tokens(tok)[:, :40]
    out, shares = {}, {}
    for fused in (False, True):
        method = build_method(cfg, info)
        prepare(cfg, model, tok, wiki_splits, method)
        monkeypatch.setattr(kernels, "fused_simulated", lambda x, group=None, f=fused: f)
        with torch.no_grad(), patched(model, method):
            out[fused] = model(ids).logits
        shares[fused] = method.tokens_per_group.tolist()
    torch.testing.assert_close(out[True], out[False], atol=2e-5, rtol=0)
    assert shares[True] == shares[False]


@pytest.mark.parametrize("B,Hq,Hkv,Tq,T,q_start,lo,hi", [
    (1, 4, 2, 70, 70, 0, 0, 70),  # a prefill: every key, GQA
    (2, 4, 4, 20, 90, 70, 5, 60),  # a later chunk scoring a slice of the keys, MHA, batch 2
    (1, 2, 1, 1, 33, 32, 32, 33),  # one decode step
])
def test_received_attention_fused_equals_blockwise_pytorch(B, Hq, Hkv, Tq, T, q_start, lo, hi, monkeypatch):
    from kvbench import kernels
    from kvbench.methods.components.grouping import received_attention

    torch.manual_seed(2)
    q, k = torch.randn(B, Hq, Tq, 16), torch.randn(B, Hkv, T, 16)
    want = received_attention(q, k, q_start, lo, hi, block_bytes=4096)  # CPU tensors: the PyTorch path
    monkeypatch.setattr(kernels, "fused_simulated", lambda x, group=None: True)
    torch.testing.assert_close(received_attention(q, k, q_start, lo, hi), want, atol=1e-7, rtol=1e-5)
