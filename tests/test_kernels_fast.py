"""Every Triton decode path against the PyTorch reference twin, under TRITON_INTERPRET=1 on a CPU (small
shapes, a few seconds each): 2/3/4 bits, G = 1/2/4/8 query heads per KV head, sink and recent fp16 tokens,
uneven splits, partial last tiles; and the automatic choice (the tuning table)."""

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kvbench.kernels import ops, reference, tuning  # noqa: E402
from kvbench.kernels import triton as tk  # noqa: E402
from kvbench.kernels.triton.common import sincos  # noqa: E402

REL_TOL = 2e-3  # measured 1e-5 .. 9e-4 here (tensor_core: fp16 folded query), 1e-4 .. 1.6e-3 on an H100


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _case(kbits, vbits, rep, sink, recent, n_packed, key_block=32, value_group=64, D=64, B=2, H=2, seed=0):
    torch.manual_seed(seed)
    T = sink + n_packed + recent
    k, v = torch.randn(B, H, T, D) * 2, torch.randn(B, H, T, D)
    q = torch.randn(B, H * rep, D) * 2
    kv = ops.build_packed_kv(k, v, kbits, vbits, key_block, value_group, sink, recent, impl="reference")
    return q, kv


def _check(q, kv, path, **tuning_kw):
    ref = ops.decode_attention(q, kv, impl="reference")
    out = ops.decode_attention(q, kv, impl="triton", path=path, **tuning_kw)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _rel(out, ref) < REL_TOL, (path, tuning_kw, _rel(out, ref))


@pytest.mark.parametrize(
    "path,kbits,vbits,rep,sink,recent,n_packed,kw",
    [
        ("cuda_core", 4, 4, 1, 0, 3, 64, {"fields": "magic"}),  # T not a multiple of the tile
        ("cuda_core", 4, 4, 1, 1, 2, 64, {"fields": "byte"}),
        ("cuda_core", 2, 2, 1, 2, 0, 96, {"fields": "byte"}),  # 3 tiles per split
        ("cuda_core", 2, 2, 1, 1, 2, 96, {"fields": "magic"}),
        ("cuda_core", 3, 3, 1, 1, 3, 64, {"fields": "byte", "tile": 8, "vec": 2}),  # two bit slices (2 + 1)
        ("cuda_core", 3, 3, 1, 1, 2, 64, {"fields": "magic", "tile": 8, "vec": 2}),
        ("cuda_core", 3, 4, 1, 1, 2, 64, {"fields": "byte", "vec": 2}),  # slices on keys only
        ("cuda_core", 4, 2, 1, 1, 2, 64, {"fields": "magic"}),
        ("cuda_core", 2, 2, 4, 0, 1, 64, {}),  # GQA: one program per query head
        ("cuda_core", 4, 4, 8, 1, 2, 32, {"tile": 8}),
        ("tensor_core", 4, 4, 4, 0, 3, 64, {"tile": 16}),
        ("tensor_core", 2, 2, 4, 2, 5, 96, {"tile": 16}),
        ("tensor_core", 3, 3, 2, 1, 0, 64, {"tile": 32}),  # two bit slices (2 + 1)
        ("tensor_core", 3, 3, 8, 0, 2, 64, {"tile": 16}),
        ("tensor_core", 4, 4, 2, 1, 1, 64, {"tile": 32}),  # G = 2
        ("tensor_core", 2, 2, 4, 0, 2, 1088, {"tile": 32}),  # 34 key blocks, 17 a split: the scaled-query table of each
        ("tensor_core", 4, 4, 4, 1, 3, 224, {"tile": 32, "min_rows": 1}),  # the G = 4 query rows unpadded
        ("tensor_core", 3, 3, 2, 0, 2, 96, {"tile": 16, "min_rows": 1}),
        ("tensor_core", 3, 3, 1, 1, 2, 96, {"tile": 16, "min_rows": 1}),  # MHA: one query row
        ("tensor_core", 4, 4, 1, 0, 3, 64, {"tile": 32}),  # MHA, padded to 16 rows
        ("tensor_core", 2, 2, 4, 1, 2, 128, {"tile": 32, "min_rows": 1, "num_warps": 2}),  # two warps split the tokens
        ("tensor_core", 2, 2, 4, 0, 1, 128, {"tile": 128}),  # a tile longer than the key block (32) is cut to it
        ("tensor_core", 4, 4, 4, 1, 3, 224, {"tile": 32, "min_rows": 1, "m_axis": "tokens"}),  # tokens as the dots' M
        ("tensor_core", 3, 3, 1, 1, 2, 96, {"tile": 16, "min_rows": 1, "m_axis": "tokens"}),  # MHA
        ("tensor_core", 2, 2, 8, 0, 2, 128, {"tile": 32, "min_rows": 1, "m_axis": "tokens", "num_warps": 2}),
        ("tensor_core", 4, 4, 2, 0, 1, 64, {"tile": 32, "m_axis": "tokens"}),  # G = 2 padded to 16 rows (N)
        # the table written by each split (key blocks of 32): splits that end mid-block, several steps a split
        ("tensor_core", 4, 4, 4, 1, 3, 224, {"tile": 16, "m_axis": "tokens", "min_rows": 1, "inline_table": 1}),
        ("tensor_core", 2, 2, 4, 0, 2, 1088, {"tile": 32, "inline_table": 2}),
        ("tensor_core", 3, 3, 1, 1, 2, 96, {"tile": 16, "min_rows": 1, "inline_table": 4}),  # MHA
        # the codes through tensor-memory-access descriptors: tiles past the split's end and the store's
        ("tensor_core", 4, 4, 4, 1, 3, 224, {"tile": 32, "m_axis": "tokens", "min_rows": 1, "tma": True}),
        ("tensor_core", 3, 3, 1, 1, 2, 96, {"tile": 64, "m_axis": "tokens", "min_rows": 1, "tma": True}),  # MHA
        ("tensor_core", 2, 2, 4, 0, 2, 1088, {"tile": 32, "inline_table": 2, "tma": True}),
        ("tensor_core", 3, 3, 4, 0, 2, 128, {"tile": 16, "tma": True}),
        # copy rows of several tokens (4 at 4 bits, 8 at 2), reshaped back to a token a row
        ("tensor_core", 4, 4, 4, 1, 3, 224, {"tile": 32, "m_axis": "tokens", "min_rows": 1, "tma": 4}),
        ("tensor_core", 2, 2, 1, 1, 2, 96, {"tile": 64, "m_axis": "tokens", "min_rows": 1, "tma": 8}),  # MHA
        ("tensor_core", 2, 2, 4, 0, 2, 1088, {"tile": 32, "inline_table": 2, "tma": 2}),
        # the scaled query made in registers, no table
        ("tensor_core", 4, 4, 4, 1, 3, 224, {"tile": 32, "m_axis": "tokens", "min_rows": 1, "qk_regs": True}),
        ("tensor_core", 3, 3, 1, 1, 2, 96, {"tile": 16, "min_rows": 1, "m_axis": "tokens", "qk_regs": True}),
        ("tensor_core", 2, 2, 4, 0, 2, 1088, {"tile": 32, "m_axis": "tokens", "qk_regs": True, "tma": 2}),
        ("split_k", 4, 4, 4, 0, 2, 128, {"tile": 64}),  # the same, another path (the cut is the dispatcher's)
        ("cuda_core", 4, 4, 1, 0, 2, 128, {"tile": 64}),
        ("split_k", 3, 3, 4, 1, 0, 32, {"tile": 16}),
        ("split_k", 2, 2, 1, 2, 5, 64, {"tile": 16}),
        ("split_k", 4, 4, 8, 0, 3, 64, {"tile": 32}),
    ],
)
def test_path_matches_reference(path, kbits, vbits, rep, sink, recent, n_packed, kw):
    D = 128 if path == "tensor_core" else 64  # tensor_core: 16 slice elements per token (one dot's K)
    q, kv = _case(kbits, vbits, rep, sink, recent, n_packed, value_group=D, D=D, seed=kbits * 10 + vbits + rep)
    _check(q, kv, path, n_splits=2, **kw)


@pytest.mark.parametrize("path,kw", [("split_k", {}), ("cuda_core", {}), ("tensor_core", {}),
                                     ("tensor_core", {"inline_table": 2}), ("tensor_core", {"tma": True}),
                                     ("tensor_core", {"qk_regs": True, "m_axis": "tokens"})])
def test_kernels_read_the_counts_from_the_gpu(path, kw):
    """What a replayed CUDA graph relies on: a launch whose host-side fields were taken when the cache held
    fewer tokens (packed and recent) attends over the counts on the GPU, as the reference does over the
    current cache; the split plan follows the capacity, so it is the same in both states."""
    D = 128 if path == "tensor_core" else 64
    rep = 1 if path == "cuda_core" else 4
    q, kv = _case(4, 4, rep, 0, 6, 128, key_block=32, value_group=D, D=D)
    ref = ops.decode_attention(q, kv, impl="reference")
    stale = dataclasses.replace(kv, n_packed=64, n_recent=2, packed_len=torch.tensor([128]),
                                recent_len=torch.tensor([6]))
    out = ops.decode_attention(q, stale, impl="triton", path=path, tile=16, **kw)
    assert _rel(out, ref) < REL_TOL, _rel(out, ref)


def test_head_dim_128_uneven_splits_large_scores():
    """D = 128 (the benchmark shape), 1-3 splits, spread-out scores (the cuda_core lazy softmax rescale)."""
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 98, 128) * 3, torch.randn(1, 2, 98, 128)
    q = torch.randn(1, 2, 128) * 3
    kv = ops.build_packed_kv(k, v, 4, 4, 32, 128, 0, 2, impl="reference")
    for n_splits in (1, 2, 3):
        _check(q, kv, "cuda_core", n_splits=n_splits, tile=16)


@pytest.mark.parametrize(
    "bits,rep,path,kw",
    [
        (4, 1, "cuda_core", {}),
        (2, 1, "cuda_core", {}),
        (3, 1, "cuda_core", {"tile": 8}),
        (4, 4, "tensor_core", {}),  # tile 64: the second (only partial) tile of the second key block
        (2, 4, "tensor_core", {"tile": 16}),
        (3, 4, "tensor_core", {"tile": 16}),
        (4, 4, "tensor_core", {"tile": 16, "inline_table": 2}),  # a split's table rows stop at its tokens
        (3, 4, "tensor_core", {"tile": 16, "tma": True}),  # bulk copies read the NaN-scaled rows: weight zero
        (4, 1, "tensor_core", {"tile": 16, "qk_regs": True, "m_axis": "tokens"}),  # the key block's scales per tile
    ],
)
def test_partial_last_tile(bits, rep, path, kw):
    """n_packed not a multiple of the tile or the key block (calibrated scales pack token by token); the
    scales / words past n_packed are garbage (NaN scales) and must not leak into the result."""
    D = 128 if path == "tensor_core" else 64
    q, full = _case(bits, bits, rep, 0, 3, 128, key_block=64, value_group=D, D=D, B=1, seed=bits + rep)
    n_packed = 64 + 23  # second key block partial, last tile partial for tiles 8 / 16 / 64
    vs = full.v_scale.clone()
    vs[:, :, n_packed:] = float("nan")
    _check(q, dataclasses.replace(full, n_packed=n_packed, v_scale=vs), path, n_splits=2, **kw)


@pytest.mark.parametrize(
    "kbits,vbits,rep,value_group,path",
    [
        (4, 4, 1, 128, "cuda_core"),
        (3, 3, 1, 128, "cuda_core"),
        (2, 2, 1, 128, "cuda_core"),
        (4, 4, 4, 128, "tensor_core"),
        (2, 2, 8, 128, "tensor_core"),
        (3, 3, 4, 128, "tensor_core"),
        (2, 2, 32, 128, "cuda_core"),  # G > 16: tensor_core does not apply, 2-bit stays on CUDA cores
        (4, 4, 1, 32, "split_k"),  # two value groups per token
    ],
)
def test_auto_choice(kbits, vbits, rep, value_group, path):
    q, kv = _case(kbits, vbits, rep, 0, 0, 32, value_group=value_group, D=128, B=1, H=1)
    assert tk.choose(q, kv)["path"] == path


def test_choice_is_data_and_forced_paths_are_checked():
    q, kv = _case(4, 4, 4, 0, 0, 32, value_group=128, D=128, B=1, H=1)
    rule = tk.choose(q, kv, tile=16)
    assert rule["path"] == "tensor_core" and rule["tile"] == 16 and rule["gpu"] == "cpu"
    assert rule["measured_on"] == tuning.table()["default"]["measured_on"]
    assert tk.choose(q, kv, "cuda_core")["path"] == "cuda_core"  # forced where the table would not choose it
    grouped = ops.build_packed_kv(torch.randn(1, 1, 32, 64), torch.randn(1, 1, 32, 64), 4, 4, 32, 32,
                                  impl="reference")
    with pytest.raises(ValueError, match="does not apply"):
        tk.choose(q[:, :1], grouped, "tensor_core")
    with pytest.raises(ValueError, match="Known: auto, cuda_core, split_k, tensor_core"):
        tk.choose(q, kv, "fmag")
    with pytest.raises(ValueError, match="unknown tuning keys"):
        tk.choose(q, kv, mode=3)
    with pytest.raises(ValueError, match=r"cuda_core path takes no tuning keys \['maxnreg'\]"):
        tk.choose(q, kv, "cuda_core", maxnreg=128)  # another path's knob: one error, not a TypeError in the launch


def _run_ptx(asm: str, words):
    """Carry out the shift-then-LOP3 PTX of ``tensor_core._magic`` on uint32 words (numpy: an independent
    reading of its text), giving the two fp16 halves of each result."""
    import re

    import numpy as np

    shift = re.search(r"(shl|shr|mov)\.b32 t, \$1(?:, (\d+))?;", asm)
    lop = re.search(r"lop3\.b32 \$0, t, 0x([0-9A-F]{8}), 0x([0-9A-F]{8}), 0xEA;", asm)
    t = words.astype(np.uint64)
    n = int(shift.group(2) or 0)
    t = (t << n) if shift.group(1) == "shl" else (t >> n)
    out = ((t & 0xFFFFFFFF) & int(lop.group(1), 16)) | int(lop.group(2), 16)  # LOP3 0xEA: (a & b) | c
    return out.astype(np.uint32).view(np.float16).reshape(-1, 2)


@pytest.mark.parametrize("side", [0, 1])
@pytest.mark.parametrize("width", [1, 2, 4])
def test_tensor_core_unpack_ptx_gives_offset_codes(width, side):
    """Each field's PTX turns a register of two int16 half-words into fp16 ``constant + code`` of that field
    for both halves, for every bit pattern of the other fields (which must not leak in); the constant is the one
    the kernel takes off (``FIELD_OFF``, keys and values)."""
    import numpy as np

    from kvbench.kernels.triton import tensor_core

    n = 16 // width if width > 1 else 8
    at = (side * 5 + width) * 8  # the kernel's index of field 0
    table = tensor_core.PTX.value[at: at + n]
    consts = tensor_core.FIELD_OFF.value[at: at + n]
    rng = np.random.default_rng(0)
    halves = rng.integers(0, 1 << 16, size=(4096, 2), dtype=np.uint32)
    if width == 1:  # the 1-bit slice is bytes widened (sign-extended) to int16
        halves = (halves & 0xFF) | np.where(halves & 0x80, 0xFF00, 0)
    words = halves[:, 0] | (halves[:, 1] << 16)
    for j, asm in enumerate(table):
        field = (halves >> (j * width)) & ((1 << width) - 1)
        got = _run_ptx(asm, words)
        assert (got.astype(np.float64) - field == consts[j]).all(), (j, asm)  # exact: no rounding either
        assert consts[j] <= (64 if side else 256)  # values keep small constants (see tensor_core.SHIFTS)


@pytest.mark.parametrize("n_prog,waves", [(3, 2), (8, 4), (64, 4), (5, 1), (40, 1)])
def test_split_plan_never_launches_a_partial_second_round(n_prog, waves):
    """The splits are rounded down: at most ``waves`` programs per SM (``num_sms`` is 4 on a CPU), at least one
    split, and the splits cover every packed token with no empty one."""
    import triton

    from kvbench.kernels.triton.common import num_sms, split_plan

    q, kv = _case(4, 4, 1, 0, 0, 2048, key_block=32)
    plan = split_plan(q, kv, 16, 16, n_prog, waves)
    slots = waves * num_sms(q.device)
    assert plan.n_splits == max(1, slots // n_prog)
    assert n_prog * plan.n_splits <= max(slots, n_prog)
    per = triton.cdiv(triton.cdiv(kv.n_packed, plan.unit), plan.n_splits) * plan.unit  # split_range's cut
    assert plan.unit == 16 and per * plan.n_splits >= kv.n_packed > per * (plan.n_splits - 1)


def test_decode_kernels_do_not_recompile_as_the_cache_grows():
    """Every integer argument of a decode kernel (counts, capacities, split plans) is left unspecialised: Triton
    otherwise compiles a new variant when a count turns a multiple of 16, in the middle of a generation."""
    import inspect

    from kvbench.kernels.triton import common, cuda_core, split_k, tensor_core

    kernels = {name: f for m in (common, cuda_core, split_k, tensor_core) for name, f in vars(m).items()
               if name.endswith("_kernel") and hasattr(f, "fn")}  # jitted (interpreted here)
    assert len(kernels) == 5, sorted(kernels)
    for name, k in kernels.items():
        unspecialised = getattr(k, "do_not_specialize", None) or k.kwargs.get("do_not_specialize", [])
        params = inspect.signature(k.fn).parameters.values()
        counts = [p.name for p in params if "constexpr" not in str(p.annotation)
                  and not p.name.endswith(("_ptr", "_desc"))  # a descriptor is keyed by its dtype and box only
                  and p.name not in ("sm_scale", "H")]  # H: the model's KV heads, fixed
        assert counts and set(counts) <= set(unspecialised), (name, counts, unspecialised)


def test_tensor_core_bad_launch_fails_before_any_kernel(monkeypatch):
    """A bad ``m_axis``, a tile that does not divide the key block, an ``inline_table`` that is not a power of
    two, or a ``tma`` copy row the tile, the width or the capacity does not allow is one ValueError before the
    table launch."""
    from kvbench.kernels.triton import tensor_core

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched")

    monkeypatch.setattr(tensor_core, "_table_kernel", NoLaunch())
    monkeypatch.setattr(tensor_core, "_tensor_core_kernel", NoLaunch())
    q, kv = _case(4, 4, 4, 0, 2, 64, value_group=128, D=128)  # a format tensor_core applies to
    with pytest.raises(ValueError, match="m_axis must be one of"):
        ops.decode_attention(q, kv, impl="triton", path="tensor_core", tile=32, m_axis="rows")
    with pytest.raises(ValueError, match="must divide key_block"):
        ops.decode_attention(q, kv, impl="triton", path="tensor_core", tile=24)
    for bad in (3, -1):
        with pytest.raises(ValueError, match="inline_table must be 0 or a power of two"):
            ops.decode_attention(q, kv, impl="triton", path="tensor_core", tile=32, inline_table=bad)
    for bad in ({"m_axis": "group"}, {"m_axis": "tokens", "inline_table": 2}):
        with pytest.raises(ValueError, match="qk_regs makes the scaled query in registers"):
            ops.decode_attention(q, kv, impl="triton", path="tensor_core", tile=32, qk_regs=True, **bad)
    for bad, match in ((3, "tma must be 0 or a power of two"), (64, "dividing the tile"),
                       (16, "holds 8 tokens at most at 4 bits")):
        with pytest.raises(ValueError, match=match):
            ops.decode_attention(q, kv, impl="triton", path="tensor_core", tile=32, tma=bad)
    with pytest.raises(ValueError, match="tma 4 needs a cache capacity that is a multiple of 4, got 66"):
        tensor_core.descriptors(torch.zeros(1, 2, 66, 16, dtype=torch.int32), 4, 32, 4)  # built before any launch


@triton.jit
def _sincos_kernel(x_ptr, s_ptr, c_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    s, c = sincos(tl.load(x_ptr + o), False)
    tl.store(s_ptr + o, s)
    tl.store(c_ptr + o, c)


def test_sincos_reduction_matches_float64_at_long_positions():
    """The split_k kernel's RoPE ``sincos``: HF's fp32 angles ``position * inv_freq`` for positions up to 3M (past
    libdevice's fast range, 105615), within 3e-7 of float64 sin/cos of the same fp32 angle. On a GPU the reduced
    angle goes to the one-instruction approximations (about 5e-7 more); here to tl.sin/tl.cos."""
    pos = torch.tensor([0, 1, 4095, 32767, 105616, 131071, 1_000_003, 3_000_000], dtype=torch.float32)
    x = (pos[:, None] * reference.default_inv_freq(128)[None, :]).reshape(-1)  # 8 x 64 fp32 angles
    s, c = torch.empty_like(x), torch.empty_like(x)
    _sincos_kernel[(1,)](x, s, c, N=x.numel())
    assert (s.double() - x.double().sin()).abs().max() < 3e-7
    assert (c.double() - x.double().cos()).abs().max() < 3e-7
