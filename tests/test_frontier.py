"""The frontier components: per-layer widths under a budget (met exactly, optimal against brute
force, recorded and counted), and the KIVI preset against hand-written KIVI quantizers."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvbench.methods.components.layer_bits import allocate, candidate_widths


def test_candidate_widths():
    assert candidate_widths(3, None) == [2, 3, 4]
    assert candidate_widths(2, None) == [1, 2, 3]
    assert candidate_widths(2, None, floor=2) == [2, 3]
    assert candidate_widths(3, [4, 2, 3]) == [2, 3, 4]


@pytest.mark.parametrize("units,budget,want", [(60, 3.0, 3.0), (60, 2.7, 2.7), (60, 2.71, 2.7), (7, 2.5, 17 / 7),
                                               (10, 9.0, 4.0)])
def test_budget_is_met_exactly_or_closest_below(units, budget, want):
    """The realised mean width is ``floor(budget * U) / U``: the budget itself when that is an
    integer number of unit-bits, else the closest achievable average below it (capped at the widest)."""
    g = torch.Generator().manual_seed(units)
    errors = torch.rand(units, 3, generator=g).sort(-1, descending=True).values
    bits = allocate(errors, [2, 3, 4], budget)
    assert bits.shape == (units,)
    assert float(bits.double().mean()) == pytest.approx(want, abs=1e-12)
    assert set(bits.tolist()) <= {2, 3, 4}


def test_greedy_matches_brute_force_on_convex_errors():
    """Errors that halve with every bit (convex): the greedy allocation is the minimum-error one."""
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(5, generator=g) * 10  # (U,)
    widths = [1, 2, 3]
    errors = scale[:, None] * torch.tensor([4.0 ** -b for b in widths])  # (U, 3)
    for budget in (1.0, 1.6, 2.0, 2.4, 3.0):
        got = allocate(errors, widths, budget)
        best = min((sum(errors[u, widths.index(b)] for u, b in enumerate(combo)), combo)
                   for combo in itertools.product(widths, repeat=5) if sum(combo) <= int(budget * 5 + 1e-9))
        assert float(sum(errors[u, widths.index(int(b))] for u, b in enumerate(got))) == pytest.approx(float(best[0]))


def test_budget_below_smallest_width_is_refused():
    from kvbench.errors import UserError

    with pytest.raises(UserError, match="bit_budget"):
        allocate(torch.rand(4, 3), [2, 3, 4], 1.5)


@pytest.mark.parametrize("granularity,budget", [("layer", "2.5"), ("head", "3")])
def test_layer_bits_through_calibration(granularity, budget, tiny_model, wiki_splits, compose, tmp_path):
    """uniform + method.layer_bits: the artifact holds the allocation, its mean is the budget, the
    model quantizes each layer at its width, and avg_bits counts it."""
    from kvbench.calibration import artifact_path, prepare
    from kvbench.quant import SCALE_ZERO_BITS
    from safetensors.torch import load_file
    from kvbench.run import build_method

    model, tok, info = tiny_model
    cfg = compose(["method=uniform", "model=tiny-llama", "kv.bits=3", f"method.layer_bits={granularity}",
                   f"method.bit_budget={budget}", "calib.num_samples=2", "calib.seqlen=64", f"calib.cache_dir={tmp_path}"])
    m = build_method(cfg, info)
    assert m.calibration_needs() == {"keys_post", "values", "fisher"}
    prepare(cfg, model, tok, wiki_splits, m)
    stored = load_file(artifact_path(cfg, m)[0])["layer_bits"]
    L, H = info.num_layers, info.num_kv_heads
    assert tuple(stored.shape) == ((L, 2) if granularity == "layer" else (L, 2, H))
    assert torch.equal(stored, m.layer_widths)
    U = stored.numel()
    assert float(stored.double().mean()) == int(float(budget) * U) / U
    # each layer is quantized at its own width: compare with the plain method at that width
    x = torch.randn(1, H, 4, info.head_dim)
    for layer in range(L):
        w = stored[layer, 0]
        for h in range(H):
            b = int(w if w.dim() == 0 else w[h])
            plain = build_method(compose(["method=uniform", "model=tiny-llama", f"kv.bits={b}"]), info)
            assert torch.equal(m.quantize_keys(x, layer)[:, h], plain.quantize_keys(x, layer)[:, h])
    kb, vb = m.bits_per_element(64)
    overhead = SCALE_ZERO_BITS / info.head_dim
    assert kb == pytest.approx(float(stored[:, 0].double().mean()) + overhead)
    assert vb == pytest.approx(float(stored[:, 1].double().mean()) + overhead)


def test_kvquant_layer_bits_codebooks_follow_the_widths(tiny_model, wiki_splits, compose, tmp_path):
    from kvbench.calibration import prepare
    from kvbench.run import build_method

    model, tok, info = tiny_model
    cfg = compose(["method=kvquant", "model=tiny-llama", "kv.bits=3", "method.layer_bits=layer", "method.rotation=hadamard",
                   "calib.num_samples=2", "calib.seqlen=64", f"calib.cache_dir={tmp_path}"])
    m = build_method(cfg, info)
    prepare(cfg, model, tok, wiki_splits, m)
    assert float(m.layer_widths.double().mean()) == 3.0
    for layer in range(info.num_layers):
        assert m.state[f"k_cb.{layer}"].numel() == 2 ** int(m.layer_widths[layer, 0])
        assert m.state[f"v_cb.{layer}"].numel() == 2 ** int(m.layer_widths[layer, 1])


def _kivi_keys(k: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Hand-written KIVI keys: per channel, min-max over each block of tokens."""
    B, H, T, D = k.shape
    kb = k.view(B, H, T // block, block, D)
    lo, hi = kb.amin(3, keepdim=True), kb.amax(3, keepdim=True)
    s = (hi - lo).clamp_min(1e-8) / (2**bits - 1)
    return (torch.round((kb - lo) / s).clamp(0, 2**bits - 1) * s + lo).view_as(k)


def _kivi_values(v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Hand-written KIVI values: per token, min-max over groups of channels."""
    vg = v.unflatten(-1, (v.shape[-1] // group, group))
    lo, hi = vg.amin(-1, keepdim=True), vg.amax(-1, keepdim=True)
    s = (hi - lo).clamp_min(1e-8) / (2**bits - 1)
    return (torch.round((vg - lo) / s).clamp(0, 2**bits - 1) * s + lo).flatten(-2)


def test_kivi_preset(compose):
    from kvbench.model import ModelInfo
    from kvbench.quant import SCALE_ZERO_BITS
    from kvbench.run import build_method

    cfg = compose(["method=kivi", "kv.bits=2"])
    assert (cfg.method.key_axis, cfg.method.value_axis, cfg.method.key_block, cfg.method.value_group_size,
            cfg.method.recent_window, cfg.kv.group_size) == ("channel", "token", 32, 32, 128, None)
    info = ModelInfo("t", num_layers=1, num_heads=2, num_kv_heads=2, head_dim=64, max_context=512, model_type="llama")
    m = build_method(cfg, info)
    assert m.key_block == 32
    k, v = torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64)
    torch.testing.assert_close(m.quantize_keys(k, 0), _kivi_keys(k, 2, 32), rtol=0, atol=1e-6)
    torch.testing.assert_close(m.quantize_values(v, 0), _kivi_values(v, 2, 32), rtol=0, atol=1e-6)
    assert m.bits_per_element(512) == (2 + SCALE_ZERO_BITS / 32, 2 + SCALE_ZERO_BITS / 32)
    assert m.avg_bits(512) == pytest.approx((128 * 16 + 384 * (2 + SCALE_ZERO_BITS / 32)) / 512)
