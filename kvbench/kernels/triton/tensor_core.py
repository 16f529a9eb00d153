"""Decode path ``tensor_core``: GQA (G >= 2 query heads per KV head) on uniform 1-slice codes (2/4/8 bits).

One program per KV head and split; the G query heads (padded to 16 columns) share every word tile through
``tl.dot``. Codes come out of the words as exact fp16 by the fp16x2 magic number (one shift, one LOP3 and
one ``sub.f16x2`` per two codes, no conversion); the key scales are folded into the query, the value
scales into the probabilities, the zero points into bias terms. The next tile's words are loaded before
the current one is computed (register prefetch)."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    LOG2E, fp16_split, launch_args, magic_bits, split_plan, store_partial, uniform_per_token,
    use_inline_ptx,
)


@triton.jit
def _codes16(words, J: tl.constexpr, WIDTH: tl.constexpr, ASM: tl.constexpr):
    """fp16 exact codes of fields ``J`` and ``J + 16 // WIDTH`` of uint32 ``words`` (``(lo, hi)``)."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 c, t; mov.b32 c, 0x64006400; sub.f16x2 t, $2, c; mov.b32 {$0, $1}, t; }",
            "=h,=h,r", [magic_bits(words, J, WIDTH)], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:  # the same values in plain Triton (interpreter)
        x = words >> (J * WIDTH)
        lo = (x & ((1 << WIDTH) - 1)).to(tl.float16)
        hi = ((x >> 16) & ((1 << WIDTH) - 1)).to(tl.float16)
    return lo, hi


@triton.jit
def _codes16_joined(words, J0: tl.constexpr, STEP: tl.constexpr, CNT: tl.constexpr, WIDTH: tl.constexpr,
                    ASM: tl.constexpr):
    if CNT == 2:  # STEP == 16 // WIDTH here: one magic pair
        lo, hi = _codes16(words, J0, WIDTH, ASM)
        return tl.join(lo, hi)
    else:
        return tl.join(_codes16_joined(words, J0, 2 * STEP, CNT // 2, WIDTH, ASM),
                       _codes16_joined(words, J0 + STEP, 2 * STEP, CNT // 2, WIDTH, ASM))


@triton.jit
def _codes16_tile(words, WIDTH: tl.constexpr, R: tl.constexpr, NW: tl.constexpr, ASM: tl.constexpr):
    """``(R, NW)`` int32 words -> ``(R, NW * CPW)`` fp16 exact codes (channel ``w * CPW + j``)."""
    CPW: tl.constexpr = 32 // WIDTH
    f = _codes16_joined(words.to(tl.uint32, bitcast=True), 0, 1, CPW, WIDTH, ASM)
    return tl.reshape(f, (R, NW * CPW))


@triton.jit
def _load_tile(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, offs_t, t_end, NWK: tl.constexpr, NWV: tl.constexpr):
    """Key and value words ``(BT, NW*)`` and value scale / zero ``(BT,)`` of the token rows ``offs_t``."""
    tm = offs_t < t_end
    kw = tl.load(kw_ptr + (n * T_CAP + offs_t)[:, None] * NWK + tl.arange(0, NWK)[None, :], mask=tm[:, None], other=0)
    vw = tl.load(vw_ptr + (n * T_CAP + offs_t)[:, None] * NWV + tl.arange(0, NWV)[None, :], mask=tm[:, None], other=0)
    vs = tl.load(vs_ptr + n * T_CAP + offs_t, mask=tm, other=0.0)
    vz = tl.load(vz_ptr + n * T_CAP + offs_t, mask=tm, other=0.0)
    return kw, vw, vs, vz


@triton.jit
def _tensor_core_kernel(
    q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr,
    sm_scale, T_CAP, NB_CAP, S_CAP, R_CAP, n_packed, n_sink, n_recent, tiles_per_split, n_splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, KW: tl.constexpr, VW: tl.constexpr, KB: tl.constexpr,
    BT: tl.constexpr, ASM: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # b * H + h
    sp = tl.program_id(1)
    if sp == n_splits:  # the fp16 tokens' split
        fp16_split(q_ptr, n * G, n, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr, n_splits, S_CAP, R_CAP,
                   n_sink, n_recent, sm_scale, G, GP, D, 32)
    else:
        NWK: tl.constexpr = D * KW // 32
        NWV: tl.constexpr = D * VW // 32
        offs_g = tl.arange(0, GP)
        g_mask = offs_g < G
        offs_d = tl.arange(0, D)
        rows = n * G + offs_g
        qT = tl.load(q_ptr + rows[None, :] * D + offs_d[:, None], mask=g_mask[None, :], other=0.0).to(tl.float32)
        qT = qT * (sm_scale * LOG2E)  # (D, GP), log2 domain
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        corr = tl.zeros((GP,), tl.float32)  # sum p * value zero
        acc = tl.zeros((GP, D), tl.float32)
        t_begin = sp * tiles_per_split * BT
        t_end = tl.minimum(t_begin + tiles_per_split * BT, n_packed)
        ar = tl.arange(0, BT)
        kwn, vwn, vsn, vzn = _load_tile(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, t_begin + ar, t_end, NWK, NWV)
        for t0 in range(t_begin, t_end, BT):
            offs_t = t0 + ar
            tm = offs_t < t_end  # the last tile may be partial (n_packed need not be a multiple of BT)
            kwc, vwc, vsc, vzp = kwn, vwn, vsn.to(tl.float32), vzn.to(tl.float32)
            kwn, vwn, vsn, vzn = _load_tile(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, offs_t + BT, t_end, NWK, NWV)
            kb = (n * NB_CAP + t0 // KB) * D
            ksc = tl.load(ks_ptr + kb + offs_d).to(tl.float32)[:, None]  # (D, 1)
            kzp = tl.load(kz_ptr + kb + offs_d).to(tl.float32)[:, None]
            bias = tl.sum(qT * kzp, axis=0)  # (GP,)
            sT = tl.dot(_codes16_tile(kwc, KW, BT, NWK, ASM), (qT * ksc).to(tl.float16))  # (BT, GP)
            sT = tl.where(tm[:, None], sT + bias[None, :], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sT, axis=0))
            alpha = tl.exp2(m_i - m_new)
            pT = tl.exp2(sT - m_new[None, :])  # (BT, GP)
            l_i = l_i * alpha + tl.sum(pT, axis=0)
            corr = corr * alpha + tl.sum(pT * vzp[:, None], axis=0)
            pv = (pT * vsc[:, None]).to(tl.float16)
            acc = acc * alpha[:, None] + tl.dot(tl.trans(pv), _codes16_tile(vwc, VW, BT, NWV, ASM))
            m_i = m_new
        store_partial(o_ptr, lse_ptr, rows, g_mask, sp, n_splits, m_i, l_i, acc + corr[:, None], D)


def applies(kv, G: int) -> bool:
    """Uniform 2/4/8-bit codes, post-RoPE keys, no outliers, one value group per token, 2 <= G <= 16."""
    return (uniform_per_token(kv) and 2 <= G <= 16 and kv.key_bits in (2, 4, 8) and kv.value_bits in (2, 4, 8)
            and kv.k_scale.shape[-1] % 32 == 0)


def launch(q, kv, sm_scale: float, tile: int, num_warps: int, num_stages: int, waves: int, n_splits=None):
    B, Hq, D = q.shape
    H = kv.k_words.shape[1]
    plan = split_plan(q, kv, tile, tile, B * H, waves, n_splits)
    _tensor_core_kernel[(B * H, plan.grid_splits)](
        *launch_args(q, kv, plan, sm_scale),
        G=Hq // H, GP=max(16, triton.next_power_of_2(Hq // H)), D=D, KW=kv.key_bits, VW=kv.value_bits,
        KB=kv.key_block, BT=tile, ASM=use_inline_ptx(q.device), num_warps=num_warps, num_stages=num_stages,
    )
    return plan
