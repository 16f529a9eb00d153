"""Shared pieces of the Triton kernels: in-register pack/unpack of a tile, the online softmax, the fp16
sink/recent split every decode path ends with, and the split-K plan and launch arguments of the decode
paths (one program per (row, split); split ``n_splits`` is the fp16 tokens' split, reduced by
:func:`reduce_splits`)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# Sizes that change as a cache grows: not specialised (a new value divisible by 16 would otherwise compile the
# kernel again in the middle of generation, a second or more).
GROWING = ["T_CAP", "NB_CAP", "S_CAP", "R_CAP", "n_sink", "unit", "n_splits"]
# 2 pi in three fp32 parts (Cody-Waite): the first has 5 significant bits, so n * TWO_PI_1 is exact for n < 2**19
TWO_PI_1, TWO_PI_2 = tl.constexpr(6.25), tl.constexpr(0.03318530693650246)
TWO_PI_3 = tl.constexpr(2.430837753308879e-10)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def sincos(x, ASM: tl.constexpr):
    """``(sin x, cos x)`` of fp32 ``x`` with ``|x| < 2**19 * 2 pi`` (RoPE angles of positions up to 3.2M): ``x``
    less the nearest multiple of 2 pi (exactly: absolute error about 2e-7), then with ``ASM`` the GPU's
    one-instruction approximations (absolute error about 2**-21 on [-pi, pi]); else ``tl.sin``, ``tl.cos``.
    libdevice's ``sinf``/``cosf`` take tens of instructions each, and a slower path past ``|x| = 105615``."""
    n = tl.floor(x * INV_TWO_PI + 0.5)
    r = tl.fma(-n, TWO_PI_3, tl.fma(-n, TWO_PI_2, x - n * TWO_PI_1))
    if ASM:
        bits = r.to(tl.uint32, bitcast=True)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [bits], dtype=tl.uint32, is_pure=True, pack=1)
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [bits], dtype=tl.uint32, is_pure=True, pack=1)
        return s.to(tl.float32, bitcast=True), c.to(tl.float32, bitcast=True)
    return tl.sin(r), tl.cos(r)


# ----------------------------------------------------------------------------------------------
# In-register pack / unpack of one (BT, D) tile of codes (see kvbench.kernels for the layout)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _unpack_slice(row_ptr, mask, W_OFF: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    CPW: tl.constexpr = 32 // WIDTH
    NW: tl.constexpr = D // CPW
    words = tl.load(row_ptr[:, None] + W_OFF + tl.arange(0, NW)[None, :], mask=mask[:, None], other=0)  # (BT, NW)
    sh = tl.arange(0, CPW) * WIDTH
    part = (words[:, :, None] >> sh[None, None, :]) & ((1 << WIDTH) - 1)  # (BT, NW, CPW)
    return tl.reshape(part, (BT, D))


@triton.jit
def unpack_tile(row_ptr, mask, BITS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """Codes ``(BT, D)`` int32 of the rows at ``row_ptr (BT,)`` (each row: one token's words)."""
    code = tl.zeros((BT, D), tl.int32)
    if BITS & 8:
        code += _unpack_slice(row_ptr, mask, 0, 8, D, BT)
    if BITS & 4:
        code += _unpack_slice(row_ptr, mask, D * (BITS & 8) // 32, 4, D, BT) << (BITS & 8)
    if BITS & 2:
        code += _unpack_slice(row_ptr, mask, D * (BITS & 12) // 32, 2, D, BT) << (BITS & 12)
    if BITS & 1:
        code += _unpack_slice(row_ptr, mask, D * (BITS & 14) // 32, 1, D, BT) << (BITS & 14)
    return code


@triton.jit
def _pack_slice(code, row_ptr, mask, SHIFT: tl.constexpr, W_OFF: tl.constexpr, WIDTH: tl.constexpr,
                D: tl.constexpr, BT: tl.constexpr):
    CPW: tl.constexpr = 32 // WIDTH
    NW: tl.constexpr = D // CPW
    part = tl.reshape((code >> SHIFT) & ((1 << WIDTH) - 1), (BT, NW, CPW))
    sh = tl.arange(0, CPW) * WIDTH
    words = tl.sum(part << sh[None, None, :], axis=2)  # (BT, NW), disjoint bit fields
    tl.store(row_ptr[:, None] + W_OFF + tl.arange(0, NW)[None, :], words.to(tl.int32), mask=mask[:, None])


@triton.jit
def pack_tile(code, row_ptr, mask, BITS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """Store codes ``(BT, D)`` as the words of the rows at ``row_ptr (BT,)``."""
    if BITS & 8:
        _pack_slice(code, row_ptr, mask, 0, 0, 8, D, BT)
    if BITS & 4:
        _pack_slice(code, row_ptr, mask, BITS & 8, D * (BITS & 8) // 32, 4, D, BT)
    if BITS & 2:
        _pack_slice(code, row_ptr, mask, BITS & 12, D * (BITS & 12) // 32, 2, D, BT)
    if BITS & 1:
        _pack_slice(code, row_ptr, mask, BITS & 14, D * (BITS & 14) // 32, 1, D, BT)


@triton.jit
def magic_bits(words, J: tl.constexpr, WIDTH: tl.constexpr):
    """Fields ``J`` and ``J + 16 // WIDTH`` of uint32 ``words`` as two fp16 ``1024 + code`` (exact) in one
    uint32 (the fp16x2 magic number: one shift and one LOP3)."""
    SH: tl.constexpr = J * WIDTH
    M: tl.constexpr = ((1 << WIDTH) - 1) * 0x00010001
    if SH > 0:
        x = words >> SH
    else:
        x = words
    return (x & M) | 0x64006400


# ----------------------------------------------------------------------------------------------
# Online softmax and the fp16 sink / recent split
# ----------------------------------------------------------------------------------------------
@triton.jit
def softmax_step(s, m_i, l_i):
    """The online softmax's running max and sum after scores ``s (GP, BT)`` (log2 domain), the factor ``alpha``
    that rescales what came before, and the tile's weights ``p`` (fp16)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), alpha, p.to(tl.float16)


@triton.jit
def online_softmax(s, v16, m_i, l_i, acc):
    """One online-softmax step (log2 domain) for scores ``s (GP, BT)`` and values ``(BT, D)`` fp16."""
    m_i, l_i, alpha, p16 = softmax_step(s, m_i, l_i)
    return m_i, l_i, acc * alpha[:, None] + tl.dot(p16, v16)


@triton.jit
def store_partial(o_ptr, lse_ptr, rows, row_mask, sp, n_splits, m_i, l_i, acc, D: tl.constexpr):
    """Store split ``sp``'s normalised output ``acc / l (GP, D)`` and log2-sum-exp of the query ``rows``."""
    S1 = n_splits + 1
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(o_ptr + (rows[:, None] * S1 + sp) * D + tl.arange(0, D)[None, :], acc / l_safe[:, None],
             mask=row_mask[:, None])
    tl.store(lse_ptr + rows * S1 + sp, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")), mask=row_mask)


@triton.jit
def _fp16_tokens(q16, k_ptr, v_ptr, n_tok, m_i, l_i, acc, D: tl.constexpr, BTF: tl.constexpr):
    offs_d = tl.arange(0, D)
    for t0 in range(0, n_tok, BTF):
        offs_t = t0 + tl.arange(0, BTF)
        m = offs_t < n_tok
        ptr = offs_t[:, None] * D + offs_d[None, :]
        k = tl.load(k_ptr + ptr, mask=m[:, None], other=0.0).to(tl.float16)
        v = tl.load(v_ptr + ptr, mask=m[:, None], other=0.0).to(tl.float16)
        s = tl.where(m[None, :], tl.dot(q16, tl.trans(k)), float("-inf"))
        m_i, l_i, acc = online_softmax(s, v, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def split_range(sp, packed_len_ptr, unit, n_splits):
    """Packed tokens ``t_begin .. t_end - 1`` of split ``sp``: the count read from the GPU, cut into
    ``n_splits`` splits of whole ``unit`` tokens (a replayed CUDA graph launches the splits it was captured
    with over the tokens the cache holds now)."""
    n_packed = tl.load(packed_len_ptr).to(tl.int32)
    per = tl.cdiv(tl.cdiv(n_packed, unit), n_splits) * unit
    t_begin = sp * per
    return t_begin, tl.minimum(t_begin + per, n_packed)


@triton.jit
def fp16_split(q_ptr, row0, n, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr, n_splits, S_CAP, R_CAP,
               n_sink, recent_len_ptr, sm_scale, NQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
               BTF: tl.constexpr):
    """The last split of every decode path: query rows ``row0 .. row0 + NQ - 1`` (padded to ``GP``) over the
    fp16 sink and recent tokens of KV row ``n`` (``b * H_kv + h``); stores the partial output of split
    ``n_splits``. The recent count is read from the GPU (``recent_len_ptr``), so that a decode step replayed as
    a CUDA graph sees the count its own append advanced."""
    n_recent = tl.load(recent_len_ptr).to(tl.int32)
    offs_g = tl.arange(0, GP)
    g_mask = offs_g < NQ
    rows = row0 + offs_g
    q = tl.load(q_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], mask=g_mask[:, None], other=0.0)
    q16 = (q.to(tl.float32) * (sm_scale * LOG2E)).to(tl.float16)  # log2 domain
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    m_i, l_i, acc = _fp16_tokens(q16, sk_ptr + n * S_CAP * D, sv_ptr + n * S_CAP * D, n_sink, m_i, l_i, acc, D, BTF)
    m_i, l_i, acc = _fp16_tokens(q16, rk_ptr + n * R_CAP * D, rv_ptr + n * R_CAP * D, n_recent, m_i, l_i, acc,
                                 D, BTF)
    store_partial(o_ptr, lse_ptr, rows, g_mask, n_splits, n_splits, m_i, l_i, acc, D)


@triton.jit(do_not_specialize=["S1"])
def _reduce_kernel(o_ptr, lse_ptr, out_ptr, S1, SP: tl.constexpr, D: tl.constexpr, DC: tl.constexpr):
    """Query row ``program_id(0)``, channels ``DC * program_id(1) ..``: the splits' outputs weighted by their
    sum-exps."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SP)
    sm = offs_s < S1
    lse = tl.load(lse_ptr + row * S1 + offs_s, mask=sm, other=float("-inf"))
    w = tl.where(sm & (lse > float("-inf")), tl.exp2(lse - tl.max(lse, axis=0)), 0.0)
    offs_d = tl.program_id(1) * DC + tl.arange(0, DC)
    o = tl.load(o_ptr + (row * S1 + offs_s)[:, None] * D + offs_d[None, :], mask=sm[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * D + offs_d, out.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Split-K plan and launch arguments (Python)
# ----------------------------------------------------------------------------------------------
_SM_COUNT: dict = {}


def num_sms(device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def use_inline_ptx(device) -> bool:
    """Inline PTX runs on a CUDA GPU only; the interpreter runs the plain-Triton twin of the same arithmetic."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"


@dataclass
class SplitPlan:
    """Flash-decoding split of the packed tokens: ``n_splits`` splits of whole ``unit`` tokens (the kernels cut
    the count they read from the GPU, :func:`split_range`), plus one split for the fp16 tokens.
    ``o_part (rows, n_splits + 1, D)`` fp32 and ``lse (rows, n_splits + 1)``."""

    n_splits: int
    o_part: torch.Tensor
    lse: torch.Tensor
    unit: int = 1

    @property
    def grid_splits(self) -> int:
        return self.n_splits + 1


def split_plan(q, kv, tile: int, unit: int, n_prog: int, waves: int, n_splits: int | None = None) -> SplitPlan:
    """Split the packed tokens in units of ``unit`` tokens (a multiple of ``tile``) so that at most ``waves``
    programs per SM are launched (``n_prog`` programs per split; rounded down, so that when ``waves`` programs
    fit on an SM at once no SM runs a second, nearly empty round), unless ``n_splits`` is given.

    The split count follows the store's capacity (``kv.k_words.shape[2]``), not its count: a decode step
    replayed as a CUDA graph keeps it while the cache fills up to that capacity (the splits past the tokens
    held are empty); where the capacity is the count (a store built at its size) the two agree."""
    n_units = triton.cdiv(max(kv.n_packed, kv.k_words.shape[2]), unit)
    if n_splits is None:
        n_splits = max(1, min(n_units, waves * num_sms(q.device) // n_prog))
    per = max(1, triton.cdiv(n_units, max(n_splits, 1)))
    n_splits = triton.cdiv(n_units, per) if n_units else 0
    B, Hq, D = q.shape
    o_part = torch.empty(B * Hq, n_splits + 1, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B * Hq, n_splits + 1, dtype=torch.float32, device=q.device)
    return SplitPlan(n_splits, o_part, lse, unit)


def gpu_counts(q, kv) -> tuple:
    """``(packed_len, recent_len)``: ``kv.packed_len``, ``kv.recent_len``, the counts on the GPU the kernels read
    (made from ``kv.n_packed``, ``kv.n_recent`` when unset)."""
    return tuple(t if t is not None else torch.full((1,), n, dtype=torch.int64, device=q.device)
                 for t, n in ((kv.packed_len, kv.n_packed), (kv.recent_len, kv.n_recent)))


def launch_args(q, kv, plan: SplitPlan, sm_scale: float, counts: tuple | None = None) -> tuple:
    """The arguments every decode kernel starts with (its own follow)::

        q, k_words, k_scale, k_zero, v_words, v_scale, v_zero, sink_k, sink_v, recent_k, recent_v,
        o_part, lse, sm_scale, T_CAP, NB_CAP, S_CAP, R_CAP, packed_len_ptr, n_sink, recent_len_ptr,
        unit, n_splits

    ``packed_len_ptr``, ``recent_len_ptr``: ``counts``, or :func:`gpu_counts`.
    """
    counts = counts or gpu_counts(q, kv)
    return (
        q, kv.k_words, kv.k_scale, kv.k_zero, kv.v_words, kv.v_scale, kv.v_zero,
        kv.sink_k, kv.sink_v, kv.recent_k, kv.recent_v, plan.o_part, plan.lse,
        sm_scale, kv.k_words.shape[2], kv.k_scale.shape[2], kv.sink_k.shape[2], kv.recent_k.shape[2],
        counts[0], kv.n_sink, counts[1], plan.unit, plan.n_splits,
    )


def reduce_splits(q, plan: SplitPlan) -> torch.Tensor:
    """Combine the splits' partial outputs by their log-sum-exps: ``(B, H_q, D)`` in ``q.dtype``."""
    B, Hq, D = q.shape
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    S1 = plan.grid_splits
    DC = min(D, 32)  # channels per program: at batch 1 a few dozen rows would leave most SMs idle
    _reduce_kernel[(B * Hq, D // DC)](plan.o_part, plan.lse, out, S1, SP=triton.next_power_of_2(S1), D=D, DC=DC)
    return out


@functools.cache
def dummy(device) -> torch.Tensor:
    """A one-element tensor for the pointer arguments a launch does not use (one per device: no allocation and
    fill in every launch; no kernel writes it)."""
    return torch.zeros(1, dtype=torch.float16, device=device)


def uniform_per_token(kv) -> bool:
    """Uniform codes, post-RoPE keys, no outliers, one value (scale, zero) per token: the fast paths' format
    (and :attr:`~kvbench.kernels.ops.PackedKV.plain`: no per-token keys, positions, channel scales, value outliers)."""
    return (kv.k_lut is None and kv.v_lut is None and kv.inv_freq is None and kv.ol_ptr is None
            and kv.v_scale.shape[-1] == 1 and kv.plain)
