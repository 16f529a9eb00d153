"""Decode path ``cuda_core``: one query head per program on CUDA cores, reading the packed words directly
(MHA, and 2-bit GQA where ``tensor_core`` does not apply). Uniform codes of one or two bit slices (3 bits =
2 + 1), post-RoPE keys, no outliers, one value group per token.

Every tile is a ``(BT, NW)`` tile of int32 words (one token per row). Fields are extracted with
compile-time shifts, in one of two ways (``fields``):

* ``byte`` (slices of at most 4 bits): a shift and mask shared by the 4 fields at the same offset of every
  byte, then one byte permute (PRMT) places a byte under the exponent of 0.5:
  ``f = 0.5 + code * 2**-(WIDTH + 1)``;
* ``magic``: the fp16x2 magic number, one shift and one LOP3 per two fields give fp16 ``1024 + code``,
  converted to fp32 (value fields minus 1024 by one ``sub.f16x2``: the exact codes).

On a GPU the PRMT / fp16x2 steps are inline PTX; the interpreter runs the same arithmetic in plain Triton.
The key scales are folded into the query once per key block and the zero points into a bias; values
accumulate ``p * scale * f`` per (token row, channel), reduced over the rows once per program. The softmax
rescales lazily (when a tile's max exceeds the running max by more than 8 in log2). The next tile's words are
loaded before the current one is computed (register prefetch).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..reference import bit_slices
from .common import (GROWING, LOG2E, fp16_split, launch_args, magic_bits, split_plan, split_range, uniform_per_token,
                     use_inline_ptx)

BYTE, MAGIC = 1, 2
FIELDS = {"byte": BYTE, "magic": MAGIC}


@triton.jit
def _prmt_byte(x, K: tl.constexpr, ASM: tl.constexpr):
    """fp32 whose bits are ``0x3F000000 | byte_K(x) << 16`` (one PRMT with ``ASM``, else shift + mask + or)."""
    if ASM:
        if K == 0:
            r = tl.inline_asm_elementwise("{ .reg .b32 e; mov.b32 e, 0x3F000000; prmt.b32 $0, $1, e, 0x7044; }",
                                          "=r,r", [x], dtype=tl.uint32, is_pure=True, pack=1)
        elif K == 1:
            r = tl.inline_asm_elementwise("{ .reg .b32 e; mov.b32 e, 0x3F000000; prmt.b32 $0, $1, e, 0x7144; }",
                                          "=r,r", [x], dtype=tl.uint32, is_pure=True, pack=1)
        elif K == 2:
            r = tl.inline_asm_elementwise("{ .reg .b32 e; mov.b32 e, 0x3F000000; prmt.b32 $0, $1, e, 0x7244; }",
                                          "=r,r", [x], dtype=tl.uint32, is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise("{ .reg .b32 e; mov.b32 e, 0x3F000000; prmt.b32 $0, $1, e, 0x7344; }",
                                          "=r,r", [x], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        SH: tl.constexpr = 8 * K - 16
        if SH > 0:
            y = x >> SH
        elif SH < 0:
            y = x << (-SH)
        else:
            y = x
        r = (y & 0xFF0000) | 0x3F000000
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _byte_field(words, J: tl.constexpr, WIDTH: tl.constexpr, ASM: tl.constexpr):
    """fp32 ``0.5 + code_J * 2**-(WIDTH + 1)`` of field ``J`` of uint32 ``words`` (``WIDTH`` <= 4)."""
    O: tl.constexpr = J * WIDTH
    SB: tl.constexpr = (7 - WIDTH) - O % 8
    BMASK: tl.constexpr = (((1 << WIDTH) - 1) << (7 - WIDTH)) * 0x01010101
    if SB > 0:
        x = words << SB
    elif SB < 0:
        x = words >> (-SB)
    else:
        x = words
    return _prmt_byte(x & BMASK, O // 8, ASM)


@triton.jit
def _magic_pair(words, J: tl.constexpr, WIDTH: tl.constexpr, SUB: tl.constexpr, ASM: tl.constexpr):
    """fp32 fields ``J`` and ``J + 16 // WIDTH``: ``1024 + code``, or the exact code with ``SUB``."""
    if ASM:
        t = magic_bits(words, J, WIDTH)
        if SUB:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 c, t; .reg .b16 l, h; .reg .f32 a, b; mov.b32 c, 0x64006400; sub.f16x2 t, $2, c; "
                "mov.b32 {l, h}, t; cvt.f32.f16 a, l; cvt.f32.f16 b, h; mov.b32 $0, a; mov.b32 $1, b; }",
                "=r,=r,r", [t], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b16 l, h; .reg .f32 a, b; "
                "mov.b32 {l, h}, $2; cvt.f32.f16 a, l; cvt.f32.f16 b, h; mov.b32 $0, a; mov.b32 $1, b; }",
                "=r,=r,r", [t], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
        return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)
    else:
        OFF: tl.constexpr = 0.0 if SUB else 1024.0
        x = words >> (J * WIDTH)
        return (x & ((1 << WIDTH) - 1)).to(tl.float32) + OFF, ((x >> 16) & ((1 << WIDTH) - 1)).to(tl.float32) + OFF


@triton.jit
def _fields_joined(words, J0: tl.constexpr, STEP: tl.constexpr, CNT: tl.constexpr, WIDTH: tl.constexpr,
                   MODE: tl.constexpr, ASM: tl.constexpr, VAL: tl.constexpr):
    """Fields ``J0, J0 + STEP, ...`` (CNT of them) joined along new trailing axes (bit-reversed order)."""
    if CNT == 1:
        return _byte_field(words, J0, WIDTH, ASM)
    elif MODE == 2 and CNT == 2:  # fields J0 and J0 + 16 // WIDTH (= STEP here): one fp16x2 magic pair
        lo, hi = _magic_pair(words, J0, WIDTH, VAL, ASM)
        return tl.join(lo, hi)
    else:
        return tl.join(_fields_joined(words, J0, 2 * STEP, CNT // 2, WIDTH, MODE, ASM, VAL),
                       _fields_joined(words, J0 + STEP, 2 * STEP, CNT // 2, WIDTH, MODE, ASM, VAL))


@triton.jit
def _fields_tile(words, WIDTH: tl.constexpr, BT: tl.constexpr, NW: tl.constexpr, MODE: tl.constexpr,
                 ASM: tl.constexpr, VAL: tl.constexpr):
    """``(BT, NW)`` int32 words -> ``(BT, NW, CPW)`` fp32 fields (channel ``w * CPW + j``)."""
    f = _fields_joined(words.to(tl.uint32, bitcast=True), 0, 1, 32 // WIDTH, WIDTH, MODE, ASM, VAL)
    return tl.reshape(f, (BT, NW, 32 // WIDTH))


@triton.jit
def _kdot(words, qf, s2, J0: tl.constexpr, STEP: tl.constexpr, CNT: tl.constexpr, WIDTH: tl.constexpr,
          MODE: tl.constexpr, ASM: tl.constexpr):
    """``s2 (BT, NW) += sum_j f_j * qf_j``: a chain of FMAs over the fields of uint32 ``words``; ``qf
    (NW, 2, ..., 2)`` is the folded query in the bit-reversed order of ``_fields_joined``."""
    if CNT == 1:
        return s2 + _byte_field(words, J0, WIDTH, ASM) * qf[None, :]
    elif MODE == 2 and CNT == 2:
        qa, qb = tl.split(qf)
        lo, hi = _magic_pair(words, J0, WIDTH, False, ASM)
        return s2 + lo * qa[None, :] + hi * qb[None, :]
    else:
        qa, qb = tl.split(qf)
        s2 = _kdot(words, qa, s2, J0, 2 * STEP, CNT // 2, WIDTH, MODE, ASM)
        return _kdot(words, qb, s2, J0 + STEP, 2 * STEP, CNT // 2, WIDTH, MODE, ASM)


@triton.jit
def _kscore(words, qf, WIDTH: tl.constexpr, MODE: tl.constexpr, ASM: tl.constexpr):
    """Scores ``(BT,)`` of ``(BT, NW)`` int32 key words against a ``_kdot``-ordered folded query."""
    s2 = _kdot(words.to(tl.uint32, bitcast=True), qf, (words * 0).to(tl.float32), 0, 1, 32 // WIDTH, WIDTH, MODE, ASM)
    return tl.sum(s2, axis=1)


@triton.jit
def _fold(qs, ksb, kzb, KOFF: tl.constexpr, NW: tl.constexpr, CPW: tl.constexpr):
    """Fold one key block's scales ``ksb`` into the query ``qs (NW, CPW)``, its zeros into a bias; the
    result in the bit-reversed order ``(NW, 2, ..., 2)`` of ``_fields_joined``."""
    qf = qs * ksb
    bias = tl.sum(tl.sum(qs * kzb - KOFF * qf, axis=1), axis=0)
    if CPW == 4:
        qf = tl.reshape(qf, (NW, 2, 2))
    elif CPW == 8:
        qf = tl.reshape(qf, (NW, 2, 2, 2))
    elif CPW == 16:
        qf = tl.reshape(qf, (NW, 2, 2, 2, 2))
    else:
        qf = tl.reshape(qf, (NW, 2, 2, 2, 2, 2))
    return qf, bias


@triton.jit
def _chan(NW: tl.constexpr, CPW: tl.constexpr):
    """``(NW, CPW)`` channel index ``w * CPW + j``."""
    return tl.arange(0, NW)[:, None] * CPW + tl.arange(0, CPW)[None, :]


@triton.jit
def _word_tile(row_ptr, tm, W_OFF: tl.constexpr, NW: tl.constexpr, VEC: tl.constexpr):
    """``(BT, NW)`` words of the token rows at ``row_ptr (BT,)``; ``VEC`` words per thread at most."""
    w = tl.max_contiguous(tl.arange(0, NW), VEC)
    return tl.load(row_ptr[:, None] + W_OFF + w[None, :], mask=tm[:, None], other=0)


@triton.jit
def _load_tile(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, offs_t, t_end, NK: tl.constexpr, NK1: tl.constexpr,
               NV: tl.constexpr, NV1: tl.constexpr, VEC: tl.constexpr, VEC1: tl.constexpr):
    """Words of both bit slices (the first slice again as a placeholder where there is one) and value
    scale / zero of the token rows ``offs_t``, masked at ``t_end``."""
    tm = offs_t < t_end
    krow = kw_ptr + (n * T_CAP + offs_t) * (NK + NK1)
    vrow = vw_ptr + (n * T_CAP + offs_t) * (NV + NV1)
    wk = _word_tile(krow, tm, 0, NK, VEC)
    wv = _word_tile(vrow, tm, 0, NV, VEC)
    wk1 = wk
    wv1 = wv
    if NK1 > 0:
        wk1 = _word_tile(krow, tm, NK, NK1, VEC1)
    if NV1 > 0:
        wv1 = _word_tile(vrow, tm, NV, NV1, VEC1)
    vsc = tl.load(vs_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)
    vzp = tl.load(vz_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)
    return wk, wk1, wv, wv1, vsc, vzp


@triton.jit(do_not_specialize=GROWING)
def _cuda_core_kernel(
    q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr,
    sm_scale, T_CAP, NB_CAP, S_CAP, R_CAP, packed_len_ptr, n_sink, recent_len_ptr, unit, n_splits,
    G: tl.constexpr, D: tl.constexpr, KW: tl.constexpr, KW1: tl.constexpr, VW: tl.constexpr, VW1: tl.constexpr,
    KB: tl.constexpr, BT: tl.constexpr, VEC: tl.constexpr, VEC1: tl.constexpr, MODE: tl.constexpr,
    ASM: tl.constexpr, KOFF: tl.constexpr, VOFF: tl.constexpr, KFAC: tl.constexpr, KFAC1: tl.constexpr,
    VFAC: tl.constexpr, VFAC1: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b, q head)
    n = row // G  # b * H + h: the kv head it reads
    sp = tl.program_id(1)
    if sp == n_splits:  # the fp16 tokens' split
        fp16_split(q_ptr, row, n, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr, n_splits, S_CAP, R_CAP,
                   n_sink, recent_len_ptr, sm_scale, 1, 16, D, 16)
    else:
        # slice 0: KW-bit fields (the low bits of the code); slice 1 (KW1 / VW1 > 0): the next bits
        NK: tl.constexpr = KW * D // 32
        CK: tl.constexpr = 32 // KW
        NV: tl.constexpr = VW * D // 32
        NK1: tl.constexpr = KW1 * D // 32
        NV1: tl.constexpr = VW1 * D // 32
        qscale = sm_scale * LOG2E
        t_begin, t_end = split_range(sp, packed_len_ptr, unit, n_splits)
        wk, wk1, wv, wv1, vsc, vzp = _load_tile(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, t_begin + tl.arange(0, BT),
                                                t_end, NK, NK1, NV, NV1, VEC, VEC1)
        # loop-carried tiles start as zeros in the layout of the field tiles (no layout conversions)
        qf = tl.sum(_fields_joined(wk.to(tl.uint32, bitcast=True), 0, 1, CK, KW, MODE, ASM, False) * 0.0, axis=0)
        acc = _fields_tile(wv, VW, BT, NV, MODE, ASM, True) * 0.0
        l_t = _kscore(wk, qf, KW, MODE, ASM)  # per token row: sum p, sum p * scale, sum p * zero
        ps_t = l_t
        pz_t = l_t
        bias = tl.sum(l_t, axis=0)
        m_i = bias - float("inf")
        acc1 = acc
        ck = _chan(NK, CK)
        qs = tl.load(q_ptr + row * D + ck).to(tl.float32) * qscale
        if KW1 > 0:
            CK1: tl.constexpr = 32 // KW1
            qf1 = tl.sum(_fields_joined(wk1.to(tl.uint32, bitcast=True), 0, 1, CK1, KW1, MODE, ASM, False) * 0.0,
                         axis=0)
            ck1 = _chan(NK1, CK1)
            qs1 = tl.load(q_ptr + row * D + ck1).to(tl.float32) * qscale
        if VW1 > 0:
            acc1 = _fields_tile(wv1, VW1, BT, NV1, MODE, ASM, True) * 0.0
        for t0 in range(t_begin, t_end, BT):
            offs_t = t0 + tl.arange(0, BT)
            tm = offs_t < t_end
            wk_c, wk1_c, wv_c, wv1_c, vsc_c, vzp_c = wk, wk1, wv, wv1, vsc, vzp  # loaded one step ago
            wk, wk1, wv, wv1, vsc, vzp = _load_tile(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, offs_t + BT, t_end,
                                                    NK, NK1, NV, NV1, VEC, VEC1)
            if t0 % KB == 0:  # new key block (splits start on one): fold its scales and zeros
                kb = (n * NB_CAP + t0 // KB) * D
                qf, bias = _fold(qs, tl.load(ks_ptr + kb + ck).to(tl.float32) * KFAC,
                                 tl.load(kz_ptr + kb + ck).to(tl.float32), KOFF, NK, CK)
                if KW1 > 0:
                    qf1, b1 = _fold(qs1, tl.load(ks_ptr + kb + ck1).to(tl.float32) * KFAC1, 0.0, KOFF, NK1, CK1)
                    bias += b1
            s = _kscore(wk_c, qf, KW, MODE, ASM)
            if KW1 > 0:
                s += _kscore(wk1_c, qf1, KW1, MODE, ASM)
            s = tl.where(tm, s + bias, float("-inf"))
            m_t = tl.max(s, axis=0)
            if m_t - m_i > 8.0:  # lazy rescale
                alpha = tl.exp2(m_i - m_t)
                l_t = l_t * alpha
                ps_t = ps_t * alpha
                pz_t = pz_t * alpha
                acc = acc * alpha
                if VW1 > 0:
                    acc1 = acc1 * alpha
                m_i = m_t
            p = tl.exp2(s - m_i)
            pv = p * vsc_c
            l_t += p
            ps_t += pv
            pz_t += p * vzp_c
            acc += pv[:, None, None] * _fields_tile(wv_c, VW, BT, NV, MODE, ASM, True)
            if VW1 > 0:
                acc1 += pv[:, None, None] * _fields_tile(wv1_c, VW1, BT, NV1, MODE, ASM, True)
        l_i = tl.sum(l_t, axis=0)
        sp_off = tl.sum(ps_t, axis=0) * VOFF  # the fields' offset, times sum p * scale
        o = tl.reshape((tl.sum(acc, axis=0) - sp_off) * VFAC, (D,))
        if VW1 > 0:
            o += tl.reshape((tl.sum(acc1, axis=0) - sp_off) * VFAC1, (D,))
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        tl.store(o_ptr + (row * (n_splits + 1) + sp) * D + tl.arange(0, D), (o + tl.sum(pz_t, axis=0)) / l_safe)
        tl.store(lse_ptr + row * (n_splits + 1) + sp, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")))


def _slices(bits: int, head_dim: int):
    """``(w0, w1)`` widths of a code's one or two bit slices, or None for more."""
    sl = bit_slices(bits, head_dim)
    return None if len(sl) > 2 else (sl[0][0], sl[1][0] if len(sl) == 2 else 0)


def applies(kv, G: int) -> bool:
    d = kv.k_scale.shape[-1]
    return uniform_per_token(kv) and _slices(kv.key_bits, d) is not None and _slices(kv.value_bits, d) is not None


def constants(G: int, key_bits: int, value_bits: int, D: int, key_block: int, tile: int, vec: int, fields: str,
              asm: bool) -> dict:
    """The kernel's compile-time arguments for a launch (also what ``benchmarks/kernel_sass.py`` compiles)."""
    kw0, kw1 = _slices(key_bits, D)
    vw0, vw1 = _slices(value_bits, D)
    if fields not in FIELDS:
        raise ValueError(f"fields must be one of {sorted(FIELDS)}, got {fields!r}")
    mode = FIELDS[fields]
    if mode == BYTE and max(kw0, kw1, vw0, vw1) > 4:
        mode = MAGIC  # byte fields need slices of at most 4 bits
    if key_block % tile:
        raise ValueError(f"tile {tile} must divide key_block {key_block}")
    off, fac = (0.5, lambda w: float(2 << w)) if mode == BYTE else (1024.0, lambda w: 1.0)
    return dict(G=G, D=D, KW=kw0, KW1=kw1, VW=vw0, VW1=vw1, KB=key_block, BT=tile,
                VEC=vec, VEC1=max(1, vec * kw1 // kw0) if kw1 else vec, MODE=mode, ASM=asm,
                KOFF=off, VOFF=0.5 if mode == BYTE else 0.0, KFAC=fac(kw0), KFAC1=fac(kw1) * (1 << kw0),
                VFAC=fac(vw0), VFAC1=fac(vw1) * (1 << vw0))


def launch(q, kv, sm_scale: float, tile: int, num_warps: int, num_stages: int, waves: int, vec: int,
           fields: str, n_splits=None):
    B, Hq, D = q.shape
    const = constants(Hq // kv.k_words.shape[1], kv.key_bits, kv.value_bits, D, kv.key_block, tile, vec, fields,
                      use_inline_ptx(q.device))
    plan = split_plan(q, kv, tile, kv.key_block, B * Hq, waves, n_splits)  # splits start on a key block
    _cuda_core_kernel[(B * Hq, plan.grid_splits)](
        *launch_args(q, kv, plan, sm_scale), **const, num_warps=num_warps, num_stages=num_stages,
    )
    return plan
