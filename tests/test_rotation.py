"""method.rotation=hadamard: the fast transform against dense Hadamard matrices, the rotation's
exactness with quantization off, and rotated quantization against a hand-written R^T Q(R x)."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch

from conftest import tokens
from kvbench.methods.components.rotation import HadamardRotation, KVRotation, fwht


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("D", [1, 2, 16, 64, 128])
def test_fwht_matches_dense_hadamard(D):
    x = torch.randn(3, 5, D, dtype=torch.float64)
    H = torch.from_numpy(scipy.linalg.hadamard(D)).double()
    assert torch.equal(_sylvester(D), H)  # two independent constructions agree
    got = fwht(x)
    torch.testing.assert_close(got, x @ H.T, rtol=0, atol=1e-12)


def test_fwht_refuses_other_sizes():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, 12))


def test_randomized_rotation_is_orthonormal_and_seeded():
    D = 64
    r = HadamardRotation(D, seed=3)
    R = r.matrix().double()
    dense = torch.from_numpy(scipy.linalg.hadamard(D)).double() @ torch.diag(r.signs.double()) / math.sqrt(D)
    torch.testing.assert_close(R, dense, rtol=0, atol=1e-6)
    torch.testing.assert_close(R @ R.T, torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-6)
    x = torch.randn(2, 4, 7, D)
    torch.testing.assert_close(r.forward(x).double(), x.double() @ dense.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(r.inverse(r.forward(x)), x, rtol=0, atol=1e-5)
    assert torch.equal(HadamardRotation(D, 3).signs, r.signs)
    assert not torch.equal(HadamardRotation(D, 4).signs, r.signs)


def _minmax(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Hand-written asymmetric per-token (last axis) quantize-dequantize."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / (2**bits - 1)
    return torch.round((x - lo) / scale).clamp(0, 2**bits - 1) * scale + lo


def test_rotated_uniform_is_rotate_quantize_rotate_back(compose):
    from kvbench.model import ModelInfo
    from kvbench.run import build_method

    info = ModelInfo("t", num_layers=1, num_heads=2, num_kv_heads=2, head_dim=32, max_context=64, model_type="llama")
    cfg = compose(["method=uniform", "kv.bits=3", "method.rotation=hadamard", "method.rotate=keys", "method.rotation_seed=7"])
    m = build_method(cfg, info)
    k, v = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    R = torch.from_numpy(scipy.linalg.hadamard(32)).float() @ torch.diag(HadamardRotation(32, 7).signs) / math.sqrt(32)
    want_k = _minmax(k @ R.T, 3) @ R  # R^T Q(R k) on row vectors
    torch.testing.assert_close(m.quantize_keys(k, 0), want_k, rtol=0, atol=1e-5)
    torch.testing.assert_close(m.quantize_values(v, 0), _minmax(v, 3), rtol=0, atol=1e-6)  # rotate=keys only


def test_rotation_statistics():
    rot = KVRotation("hadamard", "both", 0, 16)
    x = torch.randn(2, 3, 8, 16)
    f = torch.rand(2, 3, 8, 16)
    out = rot.statistics({"keys": [x], "values": [x], "fisher_keys": [f], "attention": [f]})
    torch.testing.assert_close(out["keys"][0], rot.h.forward(x))
    torch.testing.assert_close(out["fisher_keys"][0], f.mean(-1, keepdim=True).expand_as(f))
    assert out["attention"][0] is f
    # the mean is the expectation of (R g)^2 over the random signs
    torch.manual_seed(0)
    g = torch.randn(16, dtype=torch.float64)
    H = torch.from_numpy(scipy.linalg.hadamard(16)).double() / 4
    draws = torch.stack([H @ ((torch.randint(0, 2, (16,)).double() * 2 - 1) * g) for _ in range(4000)]).pow(2).mean(0)
    torch.testing.assert_close(draws, g.pow(2).mean().expand(16), rtol=0.15, atol=0)


@pytest.mark.parametrize("name,extra", [("uniform", []), ("kvquant", ["method.pre_rope=true"]),
                                        ("qokv", ["method.pre_rope=false", "method.grouping=none",
                                                  "method.scale_keys=false", "method.scale_values=false",
                                                  "method.shift_keys=none"])])
def test_rotation_with_quantization_off_is_exact(name, extra, tiny_model, compose):
    """kv.bits=16: the rotation alone (pre- or post-RoPE keys, and values) leaves the logits unchanged
    up to float rounding."""
    from kvbench.cache import QuantizingCache, patched
    from kvbench.run import build_method

    model, tok, info = tiny_model
    cfg = compose([f"method={name}", "model=tiny-llama", "kv.bits=16", "method.rotation=hadamard", *extra])
    m = build_method(cfg, info)
    assert not m.calibration_needs()
    ids = tokens(tok)
    with torch.no_grad():
        ref = model(ids).logits
        with patched(model, m):
            out = model(ids)
    assert isinstance(out.past_key_values, QuantizingCache)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)


def test_kernel_backend_refuses_rotation(tiny_model, compose):
    from kvbench.errors import UserError
    from kvbench.run import build_method

    cfg = compose(["method=uniform", "model=tiny-llama", "kv.bits=2", "kv.backend=kernel", "method.key_axis=channel",
                   "method.rotation=hadamard"])
    with pytest.raises(UserError, match="method.rotation=none") as e:
        build_method(cfg, tiny_model[2])
    assert "\n" not in str(e.value)
