"""Quantization primitives against straightforward reference implementations (bit-exact)."""

from __future__ import annotations

import pytest
import torch

from kvbench import quant


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- uniform affine --------------------------------------------------------------------------------


def _ref_affine(x: torch.Tensor, bits: int, dim: int, group: int | None) -> torch.Tensor:
    """Loop over every group: min/max, round, dequantize."""
    xm = x.movedim(dim, -1).contiguous()
    out = torch.empty_like(xm)
    flat, oflat = xm.reshape(-1, xm.shape[-1]), out.view(-1, xm.shape[-1])
    g = group or xm.shape[-1]
    qmax = 2**bits - 1
    for r in range(flat.shape[0]):
        for s in range(0, flat.shape[1], g):
            v = flat[r, s : s + g]
            lo, hi = v.min(), v.max()
            scale = ((hi - lo) / qmax).clamp_min(1e-8)
            q = torch.clamp(torch.round((v - lo) / scale), 0, qmax)
            oflat[r, s : s + g] = q * scale + lo
    return out.movedim(-1, dim)


@pytest.mark.parametrize("bits,dim,group", [(4, -1, None), (3, -1, 8), (2, -2, None), (3, -2, 4), (8, -1, 16)])
def test_affine_matches_reference(bits, dim, group):
    x = _x(1, 2, 8, 32)  # (B, H_kv, T, D)
    torch.testing.assert_close(quant.fake_quantize_affine(x, bits, dim, group), _ref_affine(x, bits, dim, group), atol=0, rtol=0)


def test_affine_roundtrip_codes_and_16_bit_identity():
    x = _x(1, 2, 8, 16)
    codes, scale, lo = quant.quantize_affine(x, 3, dim=-1, group_size=8)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7 and scale.shape == (1, 2, 8, 2)
    assert quant.fake_quantize_affine(x, 16) is x


# -- codebooks -------------------------------------------------------------------------------------


def test_codebook_is_nearest_centroid():
    cb = torch.tensor([-0.9, -0.3, 0.05, 0.2, 0.7, 0.95])
    y = _x(4096).clamp(-1.2, 1.2)
    codes = quant.quantize_codebook(y, cb)
    ref = (y[:, None] - cb[None]).abs().argmin(-1)  # argmin: ties to the lower index
    assert torch.equal(codes.long(), ref)
    assert torch.equal(quant.dequantize_codebook(codes, cb), cb[ref])
    # on a signpost: the lower centroid
    assert quant.quantize_codebook(torch.tensor([(-0.3 + 0.05) / 2]), cb).item() == 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uniform_codebook_equals_affine(bits):
    x = _x(3, 5, 64)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    cb = quant.uniform_codebook(bits)
    codes = quant.quantize_codebook(quant.normalize(x, lo, hi), cb)
    ref_codes, _, _ = quant.quantize_affine(x, bits, dim=-1)
    assert torch.equal(codes, ref_codes)
    x_hat = quant.denormalize(quant.dequantize_codebook(codes, cb), lo, hi)
    torch.testing.assert_close(x_hat, quant.fake_quantize_affine(x, bits, dim=-1), atol=1e-6, rtol=0)


# -- k-means ---------------------------------------------------------------------------------------


def _ref_lloyd(x: torch.Tensor, init: torch.Tensor, iters: int = 300) -> torch.Tensor:
    """Textbook Lloyd with a full distance matrix (plain, unweighted)."""
    x, c = x.double(), init.double().clone()
    assign = None
    for _ in range(iters):
        new = (x[:, None] - c[None]).abs().argmin(-1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        count = torch.zeros_like(c).index_add_(0, assign, torch.ones_like(x))
        total = torch.zeros_like(c).index_add_(0, assign, x)
        c = torch.where(count > 0, total / count.clamp_min(1), c)
        order = c.argsort()
        c, assign = c[order], order.argsort()[assign]
    return c.float()


@pytest.mark.parametrize("k", [4, 8, 16])
def test_kmeans_equal_weights_is_plain_kmeans(k):
    x = torch.cat([_x(1500, seed=1) * 0.3, _x(500, seed=2) + 2])
    plain = quant.kmeans_1d(x, k)
    for w in (torch.ones_like(x), torch.full_like(x, 3.7)):
        torch.testing.assert_close(quant.kmeans_1d(x, k, w), plain, atol=1e-6, rtol=0)
    init = quant.kmeans_1d(x, k, max_iter=0)  # the weighted-quantile initialisation
    torch.testing.assert_close(plain, _ref_lloyd(x, init), atol=1e-5, rtol=0)
    assert torch.all(plain[1:] > plain[:-1])


def test_kmeans_weights_pull_centroids():
    x = torch.linspace(-1, 1, 2001)
    w = torch.where(x > 0.5, 100.0, 1.0)
    plain, weighted = quant.kmeans_1d(x, 4), quant.kmeans_1d(x, 4, w)
    assert (weighted > 0.5).sum() > (plain > 0.5).sum()  # more centroids where the weight is

    def err(c, weights):
        return (weights * (x - quant.dequantize_codebook(quant.quantize_codebook(x, c), c)) ** 2).sum()

    assert err(weighted, w) < err(plain, w)


def test_q_norm_matches_moments():
    x = _x(10000)
    cb = quant.kmeans_1d(x, 4)
    x_hat = quant.dequantize_codebook(quant.quantize_codebook(x, cb), cb)
    a, b = quant.q_norm(x_hat, x)
    y = a * x_hat + b
    torch.testing.assert_close(torch.stack([y.mean(), y.std()]), torch.stack([x.mean(), x.std()]), atol=1e-5, rtol=0)
    a2, b2 = quant.q_norm(x_hat.view(100, 100), x.view(100, 100), dim=-1)  # per-vector
    assert a2.shape == (100, 1)


# -- dense-and-sparse ------------------------------------------------------------------------------


@pytest.mark.parametrize("frac,n", [(0.01, 200), (0.01, 1000), (0.002, 1000), (0.1, 64)])
def test_outlier_mask_keeps_exactly_the_fraction(frac, n):
    x = _x(7, n)
    mask = quant.outlier_mask(x, frac, dim=-1)
    k = round(n * frac / 2)
    assert torch.equal(mask.sum(-1), torch.full((7,), 2 * k))
    if (n * frac / 2) == int(n * frac / 2):
        assert int(mask.sum()) == round(frac * mask.numel())  # exactly the requested fraction
    srt = x.sort(-1).values  # reference: outliers are the k smallest and k largest
    assert torch.equal(mask, (x < srt[:, k : k + 1]) | (x > srt[:, n - k - 1 : n - k]))
    lo, hi = quant.outlier_thresholds(x, frac, dim=-1)
    assert torch.equal(mask, (x < lo[:, None]) | (x > hi[:, None]))
    assert torch.equal(lo, srt[:, k]) and torch.equal(hi, srt[:, n - k - 1])


def test_outlier_mask_per_channel_axis():
    x = _x(3, 400, 8)  # (H, T, D): per-channel thresholds reduce over T
    mask = quant.outlier_mask(x, 0.01, dim=-2)
    assert torch.equal(mask.sum(-2), torch.full((3, 8), 4))


def test_dense_sparse_split_is_exact():
    x = _x(4, 300)
    dense, sparse = quant.dense_sparse_split(x, 0.02, dim=-1)
    assert torch.equal(dense + sparse, x)
    assert torch.equal(sparse != 0, quant.outlier_mask(x, 0.02, dim=-1))
    assert quant.outliers_per_side(100, 0.01) == 1 and quant.outliers_per_side(64, 0.01) == 0
    with pytest.raises(ValueError):
        quant.outliers_per_side(10, 1.5)
