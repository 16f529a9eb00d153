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
    auto = "fmag" if rep == 1 else ("gmma" if bits in (2, 4) else "dot")
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


def test_two_slice_codes_auto_path():
    torch.manual_seed(0)
    k, v = torch.randn(1, 1, 32, 64), torch.randn(1, 1, 32, 64)
    kv = ops.build_packed_kv(k, v, 3, 3, 32, 64, impl="reference")
    assert triton_ops.fmag_path_applies(kv, 1)  # runs (gb 1); chosen only where measured faster than "fma"
    assert triton_ops._auto_path(kv, 1) == "fmag" and triton_ops._auto_path(kv, 4) == "dot"


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


@pytest.mark.parametrize(
    "kbits,vbits,mode,tile,vec,n_packed",
    [
        (4, 4, 1, 16, 4, 64),  # byte fields + PRMT (emulated here; inline PTX on a GPU)
        (2, 2, 1, 16, 2, 96),
        (4, 2, 1, 16, 4, 64),
        (3, 3, 0, 8, 2, 64),  # two bit slices (2 + 1) on fmag
        (3, 3, 1, 8, 2, 96),
        (3, 4, 1, 16, 2, 64),  # slices on keys only
        (4, 4, 3, 16, 4, 64),  # fp16x2 magic-number pairs (emulated here as mode 5; inline PTX on a GPU)
        (2, 2, 4, 16, 2, 96),  # the same with exact key codes (mode 6 here)
        (3, 3, 3, 8, 2, 64),
        (4, 2, 3, 16, 4, 64),
    ],
)
def test_fmag_modes_and_two_slices(kbits, vbits, mode, tile, vec, n_packed):
    torch.manual_seed(kbits * 10 + vbits + mode)
    B, H, D = 2, 2, 64
    sink, recent = 1, 2
    T = sink + n_packed + recent
    k, v = torch.randn(B, H, T, D) * 2, torch.randn(B, H, T, D)
    q = torch.randn(B, H, D) * 2
    kv = ops.build_packed_kv(k, v, kbits, vbits, 32, D, sink, recent, impl="reference")
    assert triton_ops.fmag_path_applies(kv, 1)
    ref = ops.decode_attention(q, kv, impl="reference")
    out = triton_ops.decode_attention(q, kv, path="fmag", n_splits=2, tile=tile, vec=vec, mode=mode)
    assert torch.isfinite(out).all() and _rel(out, ref) < REL_TOL, _rel(out, ref)


@pytest.mark.parametrize(
    "bits,rep,path,kw",
    [
        (4, 1, "fmag", {}),
        (4, 1, "fmag", {"mode": 1}),
        (2, 1, "fmag", {"mode": 1, "pref": 2}),
        (3, 1, "fmag", {"mode": 1, "tile": 8}),
        (3, 1, "fma", {}),
        (4, 4, "mma", {}),
        (2, 4, "dot", {}),
        (4, 4, "fmag", {"gb": 4}),
        (4, 4, "fmag", {"gb": 4, "mode": 3, "num_warps": 4, "tile": 32}),
        (4, 1, "fmag", {"mode": 3}),
        (4, 4, "gmma", {}),  # tile 64: the second (only partial) tile of the second key block
        (2, 4, "gmma", {"tile": 16, "vt": 0, "n_splits": 2}),
        (4, 4, "gmma", {"tile": 32, "pref": 0}),
    ],
)
def test_partial_last_tile(bits, rep, path, kw):
    """n_packed not a multiple of the tile or the key block (calibrated scales pack token by token); the
    scales / words past n_packed are garbage (NaN scales) and must not leak into the result."""
    import dataclasses

    torch.manual_seed(bits + rep)
    B, H, D, cap = 1, 2, 64, 128
    k, v = torch.randn(B, H, cap + 3, D), torch.randn(B, H, cap + 3, D)
    q = torch.randn(B, H * rep, D) * 2
    full = ops.build_packed_kv(k, v, bits, bits, 64, D, 0, 3, impl="reference")
    n_packed = 64 + 23  # second key block partial, last tile partial for tiles 8 / 16 / 64
    vs = full.v_scale.clone()
    vs[:, :, n_packed:] = float("nan")
    kv = dataclasses.replace(full, n_packed=n_packed, v_scale=vs)
    ref = ops.decode_attention(q, kv, impl="reference")
    if path in ("fmag", "fma"):
        kw = {"n_splits": 2, **kw}
    out = triton_ops.decode_attention(q, kv, path=path, **kw)
    assert torch.isfinite(out).all() and _rel(out, ref) < REL_TOL, (path, _rel(out, ref))


@pytest.mark.parametrize(
    "bits,rep,sink,recent,n_packed,tile,vt,pref",
    [
        (4, 4, 0, 3, 64, 16, 1, 1),
        (2, 4, 2, 5, 96, 16, 0, 1),
        (4, 2, 1, 0, 64, 32, 1, 0),
        (2, 8, 0, 2, 64, 16, 1, 1),
    ],
)
def test_gmma_matches_reference(bits, rep, sink, recent, n_packed, tile, vt, pref):
    """GQA tensor-core path on fp16 magic-number codes (interpreter: plain-Triton twin of the inline PTX)."""
    torch.manual_seed(bits * 10 + rep)
    B, H, D = 2, 2, 64
    T = sink + n_packed + recent
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    q = torch.randn(B, H * rep, D) * 2
    kv = ops.build_packed_kv(k, v, bits, bits, 32, D, sink, recent, impl="reference")
    assert triton_ops.gmma_path_applies(kv, rep) and not triton_ops.gmma_path_applies(kv, 1)
    ref = ops.decode_attention(q, kv, impl="reference")
    out = triton_ops.decode_attention(q, kv, path="gmma", n_splits=2, tile=tile, vt=vt, pref=pref)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _rel(out, ref) < REL_TOL, _rel(out, ref)
