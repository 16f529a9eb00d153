"""Decode path ``tensor_core``: 1 <= G <= 16 query heads per KV head (GQA and MHA: every H200 rule) on uniform
codes of 2, 3 or 4 bits, head_dim 128.

One program per KV head and split. With ``m_axis="tokens"`` the tile's tokens are the M dimension of both
``tl.dot``s and the G query heads their N (padded to 8 inside the instruction); with ``"group"`` the G query heads
(padded to ``min_rows`` rows, or inside the instruction) are the M. The channels are cut into ``NJ`` groups (4 at 4 bits, 8 at 2 and 3 bits): group ``j`` holds channels
``NJ * c + j``, which in the word layout of :mod:`kvbench.kernels` is field ``j`` of int16 half-word ``c`` of a
token's codes (of byte ``c`` for the 1-bit slice of 3-bit codes). A tile's codes of group ``j`` are therefore an
*elementwise* function of its tile of half-words, so the compiler stages only the packed half-words through
shared memory into the tensor cores' operand layout (2 or 4 bits per code, not 16) and unpacks in registers:
one LOP3 (and part of a shared shift) per two codes gives exact fp16 ``offset_j + code`` (:func:`_magic`); the
constants come off after the dots. A launch before the decode kernel (:func:`_table_kernel`) writes, per key
block, the query rows times the block's key scales (fp16, channels in group order) and the scores' bias to a
scratch table, so the main loop reads them as it reads the codes instead of scaling and re-laying out the query
in every tile. (Built inside the decode kernel, one block after the other before each split's loop, the table
cost the H200 up to 28 % of the GQA time: docs/kernels.md.) Per tile of ``BT`` tokens:

* scores ``(GP, BT) = sum_j dot((q * k_scale)_j, codes_j(keys))`` plus the bias ``q . k_zero - sum_j offset_j *
  sum((q * k_scale)_j)``;
* values ``acc_j (GP, D / NJ) = acc_j * alpha * v_unit / max(v_scale) + dot(p * v_scale / max(v_scale),
  codes_j(values)) - offset_j * sum_t(...)``: the accumulators count in units of the last tile's max value scale
  (which keeps the fp16 products out of the subnormal range), so an element costs one FMA and one add;
  ``sum_t p * v_zero`` is added to every channel at the end.

With ``tma`` the codes reach shared memory through Hopper's tensor-memory-access descriptors (one bulk copy a
tile and bit slice, issued by one thread, waited on with a barrier) instead of a pointer per element: no address
arithmetic or masks per thread in the loop (and no spills under MHA 3-bit's 128-register cap).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .common import (GROWING, LOG2E, dummy, fp16_split, gpu_counts, launch_args, split_plan, split_range,
                     uniform_per_token, use_inline_ptx)

# Field J of an int16 half-word, two half-words per register (the tensor-core operand's K pairs), as exact fp16
# ``2**(10 - p) + code``: a LOP3 masks the field where it lies (at mantissa bit ``p``, ``p + width <= 10``) and
# ORs in the exponent that gives that bit the weight 1. A field above the mantissa, or too low for its side's
# constant, is first moved by a shift that fields of the register share (ptxas computes it once). The constants
# are taken off after the dots, from the scores' bias and from the values' sums. Keys take any constant up to 256
# (an error in a score does not grow with the context); values keep theirs small (at most 64 per field, 32 for
# 3-bit codes), because the tensor cores' sum of ``p * constant`` rounds at a size that does not shrink with
# the context while the output does: constants up to 256 on the values measured up to 3e-3 relative error at
# 128k tokens on the H200, against the 2e-3 bar.
SHIFTS = {  # per side and field width: each field's shift before its LOP3 (> 0: right, < 0: left)
    "keys": {4: (-2, 0, 6, 6), 2: (-4, -4, 0, 0, 0, 6, 6, 6), 1: (-4, -4, -4, -4, 0, 0, 0, 0)},
    "values": {4: (-4, 0, 4, 8), 2: (-6, -6, -2, 0, 0, 4, 4, 8), 1: (-8, -8, -6, -6, -4, -4, -2, -2)},
}  # width 1: the 1-bit slice of 3-bit codes (bytes, sign-extended to int16)
SIDES = tuple(SHIFTS)


def _place(side: str, width: int, j: int) -> int:
    """The mantissa bit field ``j`` of a ``width``-bit half-word lands on after its shift."""
    p = width * j - SHIFTS[side][width][j]
    assert 0 <= p and p + width <= 10, (side, width, j, p)
    return p


def _magic(side: str, width: int, j: int) -> str:
    p, move = _place(side, width, j), SHIFTS[side][width][j]
    mask = ((1 << width) - 1) << p
    magic = (25 - p) << 10  # fp16 exponent (bias 15) whose mantissa bit ``p`` weighs 1
    shift = f"shr.b32 t, $1, {move};" if move > 0 else f"shl.b32 t, $1, {-move};" if move < 0 else "mov.b32 t, $1;"
    return "{ .reg .b32 t; " + shift + f" lop3.b32 $0, t, 0x{mask:04X}{mask:04X}, 0x{magic:04X}{magic:04X}, 0xEA; }}"


def field_offsets(side: str, width: int) -> tuple[float, ...]:
    """The constant in the fp16 field of each channel group (:func:`_field`)."""
    return tuple(float(2 ** (10 - _place(side, width, j))) for j in range(len(SHIFTS[side][width])))


def offsets(side: str, bits: int) -> tuple[float, ...]:
    """The constant in the fp16 codes of each channel group (:func:`_codes`; 3 bits: ``4 * low + main``)."""
    if bits == 3:
        return tuple(4 * lo + hi for lo, hi in zip(field_offsets(side, 1), field_offsets(side, 2)))
    return field_offsets(side, bits)


def _flat(f, widths) -> tl.constexpr:
    """``f(side, width)`` (a tuple per field) as one flat tuple, entry ``(side * 5 + width) * 8 + j`` (side 0:
    keys, 1: values), the index the kernel computes from its compile-time arguments."""
    out = []
    for side in SIDES:
        for w in range(5):
            row = f(side, w) if w in widths else ()
            out += [*row, *[0] * (8 - len(row))]
    return tl.constexpr(tuple(out))


PTX = _flat(lambda side, w: tuple(_magic(side, w, j) for j in range(len(SHIFTS[side][w]))), (1, 2, 4))
FIELD_OFF = _flat(field_offsets, (1, 2, 4))
CODE_OFF = _flat(offsets, (2, 3, 4))
M_AXES = ("group", "tokens")  # what the dots' M dimension holds: the query rows, or the tile's tokens


def channel_groups(bits: int) -> int:
    """``NJ``: channel groups = codes per int16 half-word of the main bit slice (4 at 4 bits, 8 at 2 and 3)."""
    return 4 if bits == 4 else 8


@triton.jit
def _elems(words_ptr, rows, tm, W_OFF: tl.constexpr, ETYPE: tl.constexpr, NC: tl.constexpr,
           TOKENS_FIRST: tl.constexpr):
    """Elements ``0..NC-1`` (int16 half-words, or int8 bytes) of a bit slice starting at word ``W_OFF`` of the
    token rows ``rows`` (word offsets): ``(BT, NC)`` if ``TOKENS_FIRST`` else ``(NC, BT)``."""
    R: tl.constexpr = 2 if ETYPE == tl.int16 else 4  # elements per word
    base = words_ptr.to(tl.pointer_type(ETYPE)) + R * W_OFF
    c = tl.arange(0, NC)
    if TOKENS_FIRST:
        return tl.load(base + R * rows[:, None] + c[None, :], mask=tm[:, None], other=0)
    else:
        return tl.load(base + R * rows[None, :] + c[:, None], mask=tm[None, :], other=0)


@triton.jit
def _field(h, J: tl.constexpr, WIDTH: tl.constexpr, V: tl.constexpr, ASM: tl.constexpr):
    """Field ``J`` of every int16 ``h`` as fp16 ``field_offsets(side, WIDTH)[J] + code`` (side: keys, or values
    if ``V``; inline PTX on a GPU, two codes per register; plain Triton in the interpreter)."""
    if ASM:
        return tl.inline_asm_elementwise(PTX[(V * 5 + WIDTH) * 8 + J], "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)
    else:
        return ((h >> (J * WIDTH)) & ((1 << WIDTH) - 1)).to(tl.float16) + FIELD_OFF[(V * 5 + WIDTH) * 8 + J]


@triton.jit
def _tile(words_ptr, rows, tm, BITS: tl.constexpr, NC: tl.constexpr, TOKENS_FIRST: tl.constexpr):
    """The packed elements of one tile: ``(main, low)``; ``low`` (the 1-bit slice, bytes widened to int16)
    only at 3 bits."""
    main = _elems(words_ptr, rows, tm, 0, tl.int16, NC, TOKENS_FIRST)
    if BITS == 3:
        low = _elems(words_ptr, rows, tm, NC // 2, tl.int8, NC, TOKENS_FIRST).to(tl.int16)
    else:
        low = main
    return main, low


@triton.jit
def _tile_tma(desc, low_desc, row0, BITS: tl.constexpr, NC: tl.constexpr, TOKENS_FIRST: tl.constexpr,
              BT: tl.constexpr, R: tl.constexpr):
    """:func:`_tile` through tensor-memory-access descriptors (:func:`descriptors`): ``BT`` tokens from flat token
    row ``row0``, ``R`` tokens a copy row, one bulk copy per bit slice instead of an address per thread. Rows
    past the split's end are read as they lie (finite codes whose weight is zero; past the store, zeros)."""
    main = desc.load([row0 // R, 0])
    if R > 1:  # copy rows of R tokens back to one token a row (row-major: a view of the same elements)
        main = tl.reshape(main, (BT, NC))
    if BITS == 3:
        low = low_desc.load([row0, 2 * NC]).to(tl.int16)
    else:
        low = main
    if TOKENS_FIRST:
        return main, low
    else:
        return tl.trans(main), tl.trans(low)


@triton.jit
def _offset(J: tl.constexpr, BITS: tl.constexpr, V: tl.constexpr):
    """The constant in the fp16 codes of channel group ``J`` (:func:`offsets`; keys, or values if ``V``)."""
    return CODE_OFF[(V * 5 + BITS) * 8 + J]


@triton.jit
def _codes(main, low, J: tl.constexpr, BITS: tl.constexpr, V: tl.constexpr, ASM: tl.constexpr):
    """``offsets(side, BITS)[J] + code`` of channel group ``J``, exact in fp16."""
    if BITS == 3:
        return _field(low, J, 1, V, ASM) * 4.0 + _field(main, J, 2, V, ASM)
    else:
        return _field(main, J, BITS, V, ASM)


@triton.jit
def _score_part(s, qk_rows, qm, main, low, J: tl.constexpr, NC: tl.constexpr, BITS: tl.constexpr,
                ASM: tl.constexpr, TOKENS_M: tl.constexpr):
    """Channel group ``J``'s part of the scores: its scaled query fp16, read from the table of
    :func:`_table_kernel` (so it reaches the tensor cores as the codes do), times the codes. ``(GP, BT)``, or
    with ``TOKENS_M`` ``(BT, GP)`` (codes ``(BT, NC)`` times the query ``(NC, GP)``)."""
    qk = tl.load(qk_rows + J * NC, mask=qm, other=0.0)
    if TOKENS_M:
        s = tl.dot(_codes(main, low, J, BITS, 0, ASM), qk, s)
    else:
        s = tl.dot(qk, _codes(main, low, J, BITS, 0, ASM), s)
    return s


@triton.jit
def _score_regs(s, braw, qT, ks_ptr, kz_ptr, krow, main, low, J: tl.constexpr, BITS: tl.constexpr,
                ASM: tl.constexpr):
    """:func:`_score_part` with the scaled query made in registers (``qk_regs``, tokens as M): the key block's
    scales of channel group ``J`` times the query ``qT (NC, GP)`` (log2 domain), fp16 as the table holds it;
    ``braw (NC, GP)`` gathers the scores' bias (summed over the channels after the last group)."""
    ks = tl.load(ks_ptr + krow + J).to(tl.float32)
    kz = tl.load(kz_ptr + krow + J).to(tl.float32)
    qk = (qT * ks[:, None]).to(tl.float16)
    s = tl.dot(_codes(main, low, J, BITS, 0, ASM), qk, s)
    return s, braw + qT * kz[:, None] - _offset(J, BITS, 0) * qk.to(tl.float32)


@triton.jit
def _qT(q_ptr, rows, c, qm, sm_scale, J: tl.constexpr, NJ: tl.constexpr, D: tl.constexpr):
    """Channels ``NJ * c + J`` of the query rows, ``(NC, GP)`` fp32 in the log2 domain."""
    return tl.load(q_ptr + rows[None, :] * D + NJ * c[:, None] + J, mask=qm, other=0.0).to(tl.float32) * (
        sm_scale * LOG2E)


@triton.jit
def _table_rows(q_ptr, ks_ptr, kz_ptr, qk_ptr, bias_ptr, n, blk0, n_blk, sm_scale, NB_CAP, G: tl.constexpr,
                GQ: tl.constexpr, D: tl.constexpr, NJ: tl.constexpr, BITS: tl.constexpr, CB: tl.constexpr):
    """The scaled-query table of KV row ``n``, key blocks ``blk0 .. blk0 + CB - 1`` (those below ``n_blk``): per
    block the query rows scaled by the block's key scales (log2 domain), fp16, channels in group order (table
    column ``j * D / NJ + c`` holds channel ``NJ * c + j``), and the scores' bias ``q . k_zero - sum_j offset_j *
    sum(scaled query of group j)`` (the codes' constants come off here). Loads and stores are contiguous rows
    (the channels are put in group order in registers)."""
    NC: tl.constexpr = D // NJ
    R: tl.constexpr = CB * GQ
    r = tl.arange(0, R)
    blk = blk0 + r // GQ
    g = r % GQ
    ok = (g < G) & (blk < n_blk)
    d = tl.arange(0, D)
    off = tl.zeros((D,), tl.float32)  # each channel's code constant
    for j in tl.static_range(NJ):
        off = tl.where(d % NJ == j, _offset(j, BITS, 0), off)
    q = tl.load(q_ptr + (n * G + g)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    q = q * (sm_scale * LOG2E)
    at = (n * NB_CAP + blk)[:, None] * D + d[None, :]
    ks = tl.load(ks_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    kz = tl.load(kz_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    qk = (q * ks).to(tl.float16)
    row = (n * NB_CAP + blk) * G + g
    grouped = tl.reshape(tl.permute(tl.reshape(qk, (R, NC, NJ)), (0, 2, 1)), (R, D))  # channel NJ * c + j -> j * NC + c
    tl.store(qk_ptr + row[:, None] * D + d[None, :], grouped, mask=ok[:, None])
    tl.store(bias_ptr + row, tl.sum(q * kz - off[None, :] * qk.to(tl.float32), axis=1), mask=ok)


@triton.jit(do_not_specialize=["NB_CAP"])
def _table_kernel(q_ptr, ks_ptr, kz_ptr, qk_ptr, bias_ptr, packed_len_ptr, sm_scale, NB_CAP, G: tl.constexpr,
                  GQ: tl.constexpr, D: tl.constexpr, NJ: tl.constexpr, BITS: tl.constexpr, KB: tl.constexpr,
                  CB: tl.constexpr):
    """The table of KV row ``program_id(0)``, ``CB`` key blocks per program (those holding packed tokens)."""
    _table_rows(q_ptr, ks_ptr, kz_ptr, qk_ptr, bias_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1) * CB,
                tl.cdiv(tl.load(packed_len_ptr).to(tl.int32), KB), sm_scale, NB_CAP, G, GQ, D, NJ, BITS, CB)


@triton.jit
def _value_part(acc, a, pv, psum, main, low, J: tl.constexpr, BITS: tl.constexpr,
                ASM: tl.constexpr, TOKENS_M: tl.constexpr):
    """``acc * a + (pv @ codes - offset_J * psum)``: the tile's dot starts from zero and is added with an FMA (fed the
    running sum as its accumulator, the tensor cores' sum drifted with the tiles of a split, past the 2e-3 bar
    on the H200). With ``TOKENS_M`` the dot is ``codes (NC, BT) @ pv (BT, GP)``, transposed back."""
    if TOKENS_M:
        d = tl.trans(tl.dot(_codes(main, low, J, BITS, 1, ASM), pv))
    else:
        d = tl.dot(pv, _codes(main, low, J, BITS, 1, ASM))
    return acc * a + (d - _offset(J, BITS, 1) * psum)


@triton.jit
def _store_part(out, acc, inv, cz, om, J: tl.constexpr):
    tl.store(out + J, acc * inv + cz, mask=om)


@triton.jit
def _tile_scales(vs_ptr, vz_ptr, bias_ptr, n, T_CAP, NB_CAP, t0, t_end, ar, offs_g, g_mask, G: tl.constexpr,
                 KB: tl.constexpr, QREG: tl.constexpr):
    """The tile at ``t0``'s value scales and zeros ``(BT,)`` fp32 and its key block's score bias ``(GP,)``
    (zeros past ``t_end``)."""
    offs_t = t0 + ar
    tm = offs_t < t_end
    vs = tl.load(vs_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)
    vz = tl.load(vz_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)
    if QREG:  # the bias is made with the scores
        bias = tl.zeros(offs_g.shape, tl.float32)
    else:
        bias = tl.load(bias_ptr + (n * NB_CAP + t0 // KB) * G + offs_g, mask=g_mask & (t0 + offs_g * 0 < t_end),
                       other=0.0)
    return vs, vz, bias


@triton.jit(do_not_specialize=GROWING)
def _tensor_core_kernel(
    q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr,
    sm_scale, T_CAP, NB_CAP, S_CAP, R_CAP, packed_len_ptr, n_sink, recent_len_ptr, unit, n_splits,
    qk_ptr, bias_ptr, k_desc, k_low_desc, v_desc, v_low_desc, G: tl.constexpr, GP: tl.constexpr,
    D: tl.constexpr, BITS: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, NJ: tl.constexpr, ASM: tl.constexpr,
    TOKENS_M: tl.constexpr, GQ: tl.constexpr, TCB: tl.constexpr, TMA: tl.constexpr, QREG: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # b * H + h
    sp = tl.program_id(1)
    if sp == n_splits:  # the fp16 tokens' split
        fp16_split(q_ptr, n * G, n, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr, n_splits, S_CAP, R_CAP,
                   n_sink, recent_len_ptr, sm_scale, G, GP, D, 16)
    else:
        NC: tl.constexpr = D // NJ  # channels per group (one dot's K)
        NW: tl.constexpr = D * BITS // 32  # words per token row
        offs_g = tl.arange(0, GP)
        g_mask = offs_g < G
        c = tl.arange(0, NC)
        rows = n * G + offs_g
        S1 = n_splits + 1
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        corr = tl.zeros((GP,), tl.float32)  # sum p * value zero
        v_unit = 1.0  # the accumulators' unit: the last tile's max value scale
        acc0 = tl.zeros((GP, NC), tl.float32)
        acc1 = tl.zeros((GP, NC), tl.float32)
        acc2 = tl.zeros((GP, NC), tl.float32)
        acc3 = tl.zeros((GP, NC), tl.float32)
        acc4 = tl.zeros((GP, NC), tl.float32)
        acc5 = tl.zeros((GP, NC), tl.float32)
        acc6 = tl.zeros((GP, NC), tl.float32)
        acc7 = tl.zeros((GP, NC), tl.float32)
        om = g_mask[:, None]  # the real query rows
        t_begin, t_end = split_range(sp, packed_len_ptr, unit, n_splits)
        if TCB > 0:  # this split's rows of the table, TCB key blocks at a time (else a launch before wrote them)
            for b in range(t_begin // KB, tl.cdiv(t_end, KB), TCB):
                _table_rows(q_ptr, ks_ptr, kz_ptr, qk_ptr, bias_ptr, n, b, tl.cdiv(t_end, KB), sm_scale, NB_CAP,
                            G, GQ, D, NJ, BITS, TCB)
            tl.debug_barrier()  # the program's threads read rows other threads wrote
        ar = tl.arange(0, BT)
        # the value scales and zeros and the scores' bias are loaded a tile ahead (the compiler stages only the
        # codes and the table, which feed the dots; these waited on memory in every tile)
        vs_next, vz_next, bias_next = _tile_scales(vs_ptr, vz_ptr, bias_ptr, n, T_CAP, NB_CAP, t_begin, t_end,
                                                   ar, offs_g, g_mask, G, KB, QREG)
        if QREG:  # the query rows by channel group, (NC, GP), for the whole split
            qmT = g_mask[None, :]
            q0 = _qT(q_ptr, rows, c, qmT, sm_scale, 0, NJ, D)
            q1 = _qT(q_ptr, rows, c, qmT, sm_scale, 1, NJ, D)
            q2 = _qT(q_ptr, rows, c, qmT, sm_scale, 2, NJ, D)
            q3 = _qT(q_ptr, rows, c, qmT, sm_scale, 3, NJ, D)
            if NJ == 8:
                q4 = _qT(q_ptr, rows, c, qmT, sm_scale, 4, NJ, D)
                q5 = _qT(q_ptr, rows, c, qmT, sm_scale, 5, NJ, D)
                q6 = _qT(q_ptr, rows, c, qmT, sm_scale, 6, NJ, D)
                q7 = _qT(q_ptr, rows, c, qmT, sm_scale, 7, NJ, D)
        for t0 in range(t_begin, t_end, BT):
            offs_t = t0 + ar
            tm = offs_t < t_end  # the last tile may be partial (n_packed need not be a multiple of BT)
            vs, vz, bias = vs_next, vz_next, bias_next
            vs_next, vz_next, bias_next = _tile_scales(vs_ptr, vz_ptr, bias_ptr, n, T_CAP, NB_CAP, t0 + BT, t_end,
                                                       ar, offs_g, g_mask, G, KB, QREG)
            blk = (n * NB_CAP + t0 // KB) * G + offs_g  # rows of the scaled-query table
            if TOKENS_M:  # the tokens are the dots' M: scores (BT, GP), transposed (a layout, not a copy)
                qk_rows = qk_ptr + blk[None, :] * D + c[:, None]
                qm = g_mask[None, :]
                s = tl.zeros((BT, GP), tl.float32)
            else:  # the query rows are the dots' M
                qk_rows = qk_ptr + blk[:, None] * D + c[None, :]
                qm = om
                s = tl.zeros((GP, BT), tl.float32)
            if TMA:
                kmain, klow = _tile_tma(k_desc, k_low_desc, (n * T_CAP + t0).to(tl.int32), BITS, NC, TOKENS_M, BT, TMA)
            else:
                kmain, klow = _tile(kw_ptr, (n * T_CAP + offs_t) * NW, tm, BITS, NC, TOKENS_M)  # (NC, BT) / (BT, NC)
            if QREG:
                krow = (n * NB_CAP + t0 // KB) * D + NJ * c
                braw = tl.zeros((NC, GP), tl.float32)
                s, braw = _score_regs(s, braw, q0, ks_ptr, kz_ptr, krow, kmain, klow, 0, BITS, ASM)
                s, braw = _score_regs(s, braw, q1, ks_ptr, kz_ptr, krow, kmain, klow, 1, BITS, ASM)
                s, braw = _score_regs(s, braw, q2, ks_ptr, kz_ptr, krow, kmain, klow, 2, BITS, ASM)
                s, braw = _score_regs(s, braw, q3, ks_ptr, kz_ptr, krow, kmain, klow, 3, BITS, ASM)
                if NJ == 8:
                    s, braw = _score_regs(s, braw, q4, ks_ptr, kz_ptr, krow, kmain, klow, 4, BITS, ASM)
                    s, braw = _score_regs(s, braw, q5, ks_ptr, kz_ptr, krow, kmain, klow, 5, BITS, ASM)
                    s, braw = _score_regs(s, braw, q6, ks_ptr, kz_ptr, krow, kmain, klow, 6, BITS, ASM)
                    s, braw = _score_regs(s, braw, q7, ks_ptr, kz_ptr, krow, kmain, klow, 7, BITS, ASM)
                bias = tl.sum(braw, axis=0)
            else:
                s = _score_part(s, qk_rows, qm, kmain, klow, 0, NC, BITS, ASM, TOKENS_M)
                s = _score_part(s, qk_rows, qm, kmain, klow, 1, NC, BITS, ASM, TOKENS_M)
                s = _score_part(s, qk_rows, qm, kmain, klow, 2, NC, BITS, ASM, TOKENS_M)
                s = _score_part(s, qk_rows, qm, kmain, klow, 3, NC, BITS, ASM, TOKENS_M)
                if NJ == 8:
                    s = _score_part(s, qk_rows, qm, kmain, klow, 4, NC, BITS, ASM, TOKENS_M)
                    s = _score_part(s, qk_rows, qm, kmain, klow, 5, NC, BITS, ASM, TOKENS_M)
                    s = _score_part(s, qk_rows, qm, kmain, klow, 6, NC, BITS, ASM, TOKENS_M)
                    s = _score_part(s, qk_rows, qm, kmain, klow, 7, NC, BITS, ASM, TOKENS_M)
            if TOKENS_M:
                s = tl.trans(s)
            s = tl.where(tm[None, :], s + bias[:, None], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])  # (GP, BT)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            corr = corr * alpha + tl.sum(p * vz[None, :], axis=1)
            vmax = tl.maximum(tl.max(tl.abs(vs), axis=0), 1e-30)
            pv = (p * (vs / vmax)[None, :]).to(tl.float16)
            pvm = tl.trans(pv) if TOKENS_M else pv  # the dots' operand
            if TMA:
                vmain, vlow = _tile_tma(v_desc, v_low_desc, (n * T_CAP + t0).to(tl.int32), BITS, NC, not TOKENS_M, BT, TMA)
            else:
                vmain, vlow = _tile(vw_ptr, (n * T_CAP + offs_t) * NW, tm, BITS, NC, not TOKENS_M)  # (BT, NC) / (NC, BT)
            psum = tl.sum(pv.to(tl.float32), axis=1)[:, None]  # times the codes' constants, this tile
            a = (alpha * (v_unit / vmax))[:, None]  # the running sums to this tile's unit
            v_unit = vmax
            acc0 = _value_part(acc0, a, pvm, psum, vmain, vlow, 0, BITS, ASM, TOKENS_M)
            acc1 = _value_part(acc1, a, pvm, psum, vmain, vlow, 1, BITS, ASM, TOKENS_M)
            acc2 = _value_part(acc2, a, pvm, psum, vmain, vlow, 2, BITS, ASM, TOKENS_M)
            acc3 = _value_part(acc3, a, pvm, psum, vmain, vlow, 3, BITS, ASM, TOKENS_M)
            if NJ == 8:
                acc4 = _value_part(acc4, a, pvm, psum, vmain, vlow, 4, BITS, ASM, TOKENS_M)
                acc5 = _value_part(acc5, a, pvm, psum, vmain, vlow, 5, BITS, ASM, TOKENS_M)
                acc6 = _value_part(acc6, a, pvm, psum, vmain, vlow, 6, BITS, ASM, TOKENS_M)
                acc7 = _value_part(acc7, a, pvm, psum, vmain, vlow, 7, BITS, ASM, TOKENS_M)
            m_i = m_new
        # normalise and store (as store_partial does), channel NJ * c + j from acc_j
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        inv = (v_unit / l_safe)[:, None]
        cz = (corr / l_safe)[:, None]
        out = o_ptr + (rows[:, None] * S1 + sp) * D + NJ * c[None, :]
        _store_part(out, acc0, inv, cz, om, 0)
        _store_part(out, acc1, inv, cz, om, 1)
        _store_part(out, acc2, inv, cz, om, 2)
        _store_part(out, acc3, inv, cz, om, 3)
        if NJ == 8:
            _store_part(out, acc4, inv, cz, om, 4)
            _store_part(out, acc5, inv, cz, om, 5)
            _store_part(out, acc6, inv, cz, om, 6)
            _store_part(out, acc7, inv, cz, om, 7)
        tl.store(lse_ptr + rows * S1 + sp, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")), mask=g_mask)


def check_inline_table(inline_table: int) -> None:
    """``inline_table`` must be 0 (the table is a launch of its own) or a power of two (key blocks a step)."""
    if inline_table < 0 or inline_table & (inline_table - 1):
        raise ValueError(f"inline_table must be 0 or a power of two, got {inline_table}")


def constants(G: int, bits: int, D: int, key_block: int, tile: int, min_rows: int, asm: bool,
              m_axis: str = "group", inline_table: int = 0, tma: int = 0, qk_regs: bool = False) -> dict:
    """The kernel's compile-time arguments for a launch (also what ``benchmarks/kernel_sass.py`` compiles)."""
    check_inline_table(inline_table)
    check_tma(tma, bits, D, tile)
    check_qk_regs(qk_regs, m_axis, inline_table)
    if key_block % tile:  # a tile reads one key block's scales
        raise ValueError(f"tile {tile} must divide key_block {key_block}")
    if m_axis not in M_AXES:
        raise ValueError(f"m_axis must be one of {M_AXES}, got {m_axis!r}")
    return dict(G=G, GP=max(min_rows, triton.next_power_of_2(G)), D=D, BITS=bits, KB=key_block, BT=tile,
                NJ=channel_groups(bits), ASM=asm, TOKENS_M=m_axis == "tokens", GQ=triton.next_power_of_2(G),
                TCB=inline_table, TMA=int(tma), QREG=bool(qk_regs))


def check_qk_regs(qk_regs: bool, m_axis: str, inline_table: int) -> None:
    """``qk_regs`` (no table) needs the tile's tokens as the dots' M and no ``inline_table``."""
    if qk_regs and (m_axis != "tokens" or inline_table):
        raise ValueError("qk_regs makes the scaled query in registers: it needs m_axis='tokens' and no inline_table")


def check_tma(tma: int, bits: int, D: int, tile: int) -> None:
    """``tma``: 0 (pointers), or the tokens a copy row holds, a power of two dividing the tile; more than one only
    at 2 and 4 bits (a token's codes are one bit slice, so a tile's are contiguous) and up to 256 half-words a
    row (the widest box a copy takes): 16 tokens at 2 bits, 8 at 4."""
    rows = int(tma)
    if rows < 0 or rows & (rows - 1) or tile % max(rows, 1):
        raise ValueError(f"tma must be 0 or a power of two dividing the tile ({tile}), got {tma}")
    most = 1 if bits == 3 else 256 // (D // channel_groups(bits))
    if rows > most:
        raise ValueError(f"tma {rows}: a copy row holds {most} token{'s' * (most > 1)} at most at {bits} bits")


def boxes(bits: int, D: int, tile: int, tma: int = 1) -> dict:
    """What :func:`descriptors` copies a tile through, per bit slice: ``{name: (dtype, box)}``, ``tile / tma`` rows
    of ``tma`` tokens' elements of one channel group (``main``: int16 half-words; ``low``, at 3 bits: the 1-bit
    slice's bytes)."""
    rows = max(int(tma), 1)
    box = [tile // rows, rows * D // channel_groups(bits)]
    return {"main": (torch.int16, box), **({"low": (torch.int8, box)} if bits == 3 else {})}


def descriptors(words: torch.Tensor, bits: int, tile: int, tma: int = 1) -> tuple:
    """Tensor-memory-access descriptors of a store's codes ``words (B, H, T_cap, W)`` int32, seen as rows of
    ``tma`` tokens (``T_cap`` a multiple of it): ``(main, low)`` of :func:`boxes` (``low`` ``None`` but at 3
    bits)."""
    rows = max(int(tma), 1)
    if words.shape[2] % rows:
        raise ValueError(f"tma {rows} needs a cache capacity that is a multiple of {rows}, got {words.shape[2]}")
    flat = words.view(-1, rows * words.shape[-1])
    out = {}
    for name, (dtype, box) in boxes(bits, words.shape[-1] * 32 // bits, tile, rows).items():
        t = flat.view(dtype)
        out[name] = TensorDescriptor(t, list(t.shape), list(t.stride()), box)
    return out["main"], out.get("low")


def applies(kv, G: int) -> bool:
    """Uniform 2/3/4-bit codes (keys and values of one width), post-RoPE keys, no outliers, one value group per
    token, 1 <= G <= 16, head_dim 128 (a channel group of 16 or 32 channels: the K of one dot)."""
    D = kv.k_scale.shape[-1]
    return uniform_per_token(kv) and 1 <= G <= 16 and kv.key_bits == kv.value_bits in (2, 3, 4) and D == 128


def launch(q, kv, sm_scale: float, tile: int, num_warps: int, num_stages: int, waves: int, n_splits=None,
           maxnreg: int | None = None, min_rows: int = 16, m_axis: str = "group", inline_table: int = 0,
           tma: int = 0, qk_regs: bool = False):
    """``maxnreg`` caps the registers per thread (more programs per SM, at the price of spills); ``None``
    leaves it to the compiler. ``min_rows``: the least M of the dots; 16 pads the query rows to the tensor
    cores' native M, 1 leaves them at the next power of two of G (Triton pads inside the instruction, and the
    softmax runs on fewer padding rows). ``inline_table``: each split writes its own rows of the scaled-query
    table before its loop, that many key blocks at a time (one launch fewer per decode); 0 writes the table in a
    launch before the decode kernel. ``tma``: the codes come through tensor-memory-access descriptors (Hopper's
    bulk copies; one thread issues a tile's copy) instead of a pointer per element, ``tma`` tokens a copy row
    (:func:`check_tma`). ``qk_regs``: no table; each tile scales the query by its key block's scales in
    registers (tokens as M)."""
    B, Hq, D = q.shape
    H = kv.k_words.shape[1]
    G = Hq // H
    const = constants(G, kv.key_bits, D, kv.key_block, tile, min_rows, use_inline_ptx(q.device), m_axis,
                      inline_table, tma, qk_regs)  # checks first
    if tma and q.is_cuda and torch.cuda.get_device_capability(q.device) < (9, 0):
        raise ValueError("tma (tensor-memory-access descriptors) needs a Hopper GPU or later")
    plan = split_plan(q, kv, tile, tile, B * H, waves, n_splits)
    descs = (*descriptors(kv.k_words, kv.key_bits, tile, tma), *descriptors(kv.v_words, kv.value_bits, tile, tma)) \
        if tma else (None,) * 4
    NB_CAP = max(kv.k_scale.shape[2], 1)  # the table has a row per key block of the store's capacity
    if qk_regs:  # no table
        qk = bias = dummy(q.device)
    else:
        qk = torch.empty(B * H, NB_CAP, G, D, dtype=torch.float16, device=q.device)
        bias = torch.empty(B * H, NB_CAP, G, dtype=torch.float32, device=q.device)
    counts = gpu_counts(q, kv)
    if not inline_table and not qk_regs:
        CB = max(1, 16 // const["GQ"])  # key blocks per table program: 16 rows of D
        _table_kernel[(B * H, triton.cdiv(NB_CAP, CB))](
            q, kv.k_scale, kv.k_zero, qk, bias, counts[0], sm_scale, NB_CAP, CB=CB, num_warps=4,
            **{k: const[k] for k in ("G", "GQ", "D", "NJ", "BITS", "KB")},
        )
    _tensor_core_kernel[(B * H, plan.grid_splits)](
        *launch_args(q, kv, plan, sm_scale, counts), qk, bias, *descs,
        **const, num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return plan
