"""CUDA-core "fma" decode-attention path (packed words, fields extracted with compile-time shifts)
against the PyTorch reference, under TRITON_INTERPRET=1 on a CPU (small shapes, a few seconds each)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from kvbench.kernels import ops, triton_ops  # noqa: E402

REL_TOL = 1e-3  # measured 1e-5 .. 6e-5 here, 1e-4 .. 4e-4 on an H100 at 8k tokens


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(
    "bits,rep,sink,recent,n_packed,tile",
    [
        (4, 1, 0, 0, 64, 16),
        (4, 1, 0, 3, 64, 32),  # T = 67: not a multiple of the tile
        (2, 1, 2, 5, 96, 16),
        (3, 1, 1, 3, 64, 8),
        (4, 4, 2, 5, 64, 16),  # GQA: one program per query head
        (2, 4, 0, 1, 64, 16),
        (3, 4, 1, 0, 32, 16),
    ],
)
def test_fma_matches_reference(bits, rep, sink, recent, n_packed, tile):
    torch.manual_seed(bits * 10 + rep)
    B, H, D = 2, 2, 64
    T = sink + n_packed + recent
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    q = torch.randn(B, H * rep, D) * 2
    kv = ops.build_packed_kv(k, v, bits, bits, 32, D, sink, recent, impl="reference")
    auto = ("fmag" if bits != 3 else "fma") if rep == 1 else ("mma" if bits == 4 else "dot")
    assert triton_ops.fma_path_applies(kv, 1) and triton_ops._auto_path(kv, rep) == auto
    ref = ops.decode_attention(q, kv, impl="reference")
    out = triton_ops.decode_attention(q, kv, path="fma", n_splits=2, tile=tile)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _rel(out, ref) < REL_TOL, _rel(out, ref)


@pytest.mark.parametrize(
    "bits,rep,gb,pref,sink,recent,n_packed,tile",
    [
        (4, 1, 1, 1, 0, 3, 64, 16),  # MHA, prefetch of the next tile
        (2, 1, 1, 2, 2, 0, 96, 16),  # two tiles in flight, 3 tiles per split
        (4, 4, 4, 1, 2, 5, 64, 16),  # GQA: 4 query heads share each word tile
        (2, 4, 2, 0, 0, 1, 64, 16),  # two heads per program, no prefetch
        (4, 8, 4, 2, 1, 2, 32, 8),  # G = 8: two programs per kv head
    ],
)
def test_fmag_matches_reference(bits, rep, gb, pref, sink, recent, n_packed, tile):
    torch.manual_seed(bits * 10 + rep)
    B, H, D = 2, 2, 64
    T = sink + n_packed + recent
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    q = torch.randn(B, H * rep, D) * 2
    kv = ops.build_packed_kv(k, v, bits, bits, 32, D, sink, recent, impl="reference")
    assert triton_ops.fmag_path_applies(kv, rep)
    ref = ops.decode_attention(q, kv, impl="reference")
    out = triton_ops.decode_attention(q, kv, path="fmag", n_splits=2, tile=tile, gb=gb, pref=pref)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _rel(out, ref) < REL_TOL, _rel(out, ref)


def test_fmag_not_for_two_slice_codes():
    torch.manual_seed(0)
    k, v = torch.randn(1, 1, 32, 64), torch.randn(1, 1, 32, 64)
    kv = ops.build_packed_kv(k, v, 3, 3, 32, 64, impl="reference")
    assert not triton_ops.fmag_path_applies(kv, 1) and triton_ops._auto_path(kv, 1) == "fma"


def test_fma_head_dim_128_lowp_and_splits():
    """D = 128 (the benchmark shape), both field placements, uneven splits, large score range."""
    torch.manual_seed(0)
    B, H, D, n_packed = 1, 2, 128, 96
    k, v = torch.randn(B, H, n_packed + 2, D) * 3, torch.randn(B, H, n_packed + 2, D)
    q = torch.randn(B, H, D) * 3  # spread-out scores: exercises the lazy softmax rescale
    kv = ops.build_packed_kv(k, v, 4, 4, 32, D, 0, 2, impl="reference")
    ref = ops.decode_attention(q, kv, impl="reference")
    for lowp, lowp_v, n_splits in ((11, 11, 1), (15, 19, 2), (19, 15, 3)):
        out = triton_ops.decode_attention(q, kv, path="fma", n_splits=n_splits, tile=16, lowp=lowp, lowp_v=lowp_v)
        assert _rel(out, ref) < REL_TOL, (lowp, n_splits, _rel(out, ref))


def test_fma_not_chosen_where_it_does_not_apply():
    torch.manual_seed(0)
    k, v = torch.randn(1, 1, 32, 64), torch.randn(1, 1, 32, 64)
    grouped = ops.build_packed_kv(k, v, 4, 4, 32, 32, impl="reference")  # two value groups per token
    assert not triton_ops.fma_path_applies(grouped, 1)
    assert triton_ops._auto_path(grouped, 1) == "dot"
