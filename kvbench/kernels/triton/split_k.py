"""Decode path ``split_k``: the generic one, for every packed format (NUQ codebooks, pre-RoPE keys, sparse
key and value outliers, grouped values, per-token keys, channel shifts/scales, the stores of a mixed-width
cache with their token positions, any bit width). Each tile is unpacked to codes, dequantized to fp16 and fed
to ``tl.dot``; the G query heads of a KV head are the rows of the product (padded to 16). A mixed-width cache
is one launch per store, all reduced together (:func:`launch_parts`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    GROWING, LOG2E, SplitPlan, dummy, fp16_split, launch_args, sincos, softmax_step, split_plan, split_range,
    store_partial, unpack_tile, use_inline_ptx,
)


@triton.jit
def _rope_tile(k, pos, inv_freq_ptr, D: tl.constexpr, BT: tl.constexpr, ASM: tl.constexpr):
    """Rotate a ``(BT, D)`` fp32 key tile at positions ``pos (BT,)`` (HF rotate_half)."""
    HALF: tl.constexpr = D // 2
    inv = tl.load(inv_freq_ptr + tl.arange(0, HALF))
    s, c = sincos(pos.to(tl.float32)[:, None] * inv[None, :], ASM)  # (BT, D/2): HF's fp32 angles
    k1, k2 = tl.split(tl.permute(tl.reshape(k, (BT, 2, HALF)), (0, 2, 1)))
    r = tl.join(k1 * c - k2 * s, k2 * c + k1 * s)  # (BT, D/2, 2)
    return tl.reshape(tl.permute(r, (0, 2, 1)), (BT, D))


@triton.jit
def _outlier_scores(s, t0, blk, n, q_ptr, q_rows, g_mask, olp_ptr, olt_ptr, olc_ptr, olv_ptr, invf_ptr,
                    sm_scale, n_sink, NB_CAP, OL_CAP, PRE_ROPE: tl.constexpr, D: tl.constexpr,
                    BT: tl.constexpr, OL_CHUNK: tl.constexpr, ASM: tl.constexpr):
    """Add the sparse key outliers of key block ``blk`` (residuals, pre-RoPE with ``PRE_ROPE``) to the
    scores ``s (GP, BT)`` of the tile starting at token ``t0``."""
    HALF: tl.constexpr = D // 2
    e_lo = tl.load(olp_ptr + n * (NB_CAP + 1) + blk)
    e_hi = tl.load(olp_ptr + n * (NB_CAP + 1) + blk + 1)
    for e0 in range(e_lo, e_hi, OL_CHUNK):
        offs_e = e0 + tl.arange(0, OL_CHUNK)
        em = offs_e < e_hi
        tok = tl.load(olt_ptr + n * OL_CAP + offs_e, mask=em, other=-1)
        ch = tl.load(olc_ptr + n * OL_CAP + offs_e, mask=em, other=0).to(tl.int32)
        val = tl.load(olv_ptr + n * OL_CAP + offs_e, mask=em, other=0.0).to(tl.float32)
        qm = g_mask[:, None] & em[None, :]
        qd = tl.load(q_ptr + q_rows[:, None] + ch[None, :], mask=qm, other=0.0).to(tl.float32)
        if PRE_ROPE:
            lowh = ch < HALF
            pair = tl.where(lowh, ch + HALF, ch - HALF)
            sign = tl.where(lowh, 1.0, -1.0)
            sin, cos = sincos((n_sink + tok).to(tl.float32) * tl.load(invf_ptr + ch % HALF), ASM)
            qp = tl.load(q_ptr + q_rows[:, None] + pair[None, :], mask=qm, other=0.0).to(tl.float32)
            contrib = val[None, :] * (qd * cos[None, :] + sign[None, :] * qp * sin[None, :])
        else:
            contrib = qd * val[None, :]
        contrib = contrib * (sm_scale * LOG2E)  # (GP, CHUNK)
        onehot = ((tok - t0)[:, None] == tl.arange(0, BT)[None, :]).to(tl.float16)  # (CHUNK, BT)
        s += tl.dot(contrib.to(tl.float16), onehot)
    return s


@triton.jit
def _value_outliers(acc, p16, t0, blk, n, vop_ptr, vot_ptr, voc_ptr, vov_ptr, NB1, VOL_CAP, D: tl.constexpr,
                    BT: tl.constexpr, OL_CHUNK: tl.constexpr):
    """Add the sparse value outliers of key block ``blk`` to the output ``acc (GP, D)``: each entry's residual times
    the weight ``p16 (GP, BT)`` of its token in the tile at ``t0`` (a token outside the tile weighs nothing)."""
    e_lo = tl.load(vop_ptr + n * NB1 + blk)
    e_hi = tl.load(vop_ptr + n * NB1 + blk + 1)
    offs_d = tl.arange(0, D)
    for e0 in range(e_lo, e_hi, OL_CHUNK):
        offs_e = e0 + tl.arange(0, OL_CHUNK)
        em = offs_e < e_hi
        tok = tl.load(vot_ptr + n * VOL_CAP + offs_e, mask=em, other=-1)
        ch = tl.load(voc_ptr + n * VOL_CAP + offs_e, mask=em, other=0).to(tl.int32)
        val = tl.load(vov_ptr + n * VOL_CAP + offs_e, mask=em, other=0.0)
        at_t = (tl.arange(0, BT)[:, None] == (tok - t0)[None, :]).to(tl.float16)  # (BT, CHUNK)
        pe = tl.dot(p16, at_t).to(tl.float16)  # (GP, CHUNK): each entry's token's weight, exactly
        at_d = tl.where(ch[:, None] == offs_d[None, :], val[:, None], 0.0).to(tl.float16)  # (CHUNK, D)
        acc = tl.dot(pe, at_d, acc)
    return acc


@triton.jit(do_not_specialize=GROWING + ["OL_CAP", "OL_NB", "VOL_CAP", "VOL_NB1"])
def _split_k_kernel(
    q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr,
    sm_scale, T_CAP, NB_CAP, S_CAP, R_CAP, packed_len_ptr, n_sink, recent_len_ptr, unit, n_splits,
    klut_ptr, vlut_ptr, olp_ptr, olt_ptr, olc_ptr, olv_ptr, invf_ptr, H, OL_CAP,
    pos_ptr, kch_ptr, vch_ptr, vop_ptr, vot_ptr, voc_ptr, vov_ptr, VOL_CAP, OL_NB, VOL_NB1,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
    KB: tl.constexpr, BT: tl.constexpr, NG: tl.constexpr,
    K_LUT: tl.constexpr, V_LUT: tl.constexpr, PRE_ROPE: tl.constexpr, HAS_OL: tl.constexpr,
    NGK: tl.constexpr, K_TOKEN: tl.constexpr, HAS_POS: tl.constexpr, K_CHAN: tl.constexpr,
    V_CHAN: tl.constexpr, HAS_VOL: tl.constexpr, ASM: tl.constexpr, OL_CHUNK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # b * H + h
    if tl.program_id(1) == n_splits:  # the fp16 tokens' split
        fp16_split(q_ptr, n * G, n, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr, n_splits, S_CAP, R_CAP,
                   n_sink, recent_len_ptr, sm_scale, G, GP, D, 32)
    else:
        sp = tl.program_id(1)
        h = n % H
        WK: tl.constexpr = KBITS * D // 32
        WV: tl.constexpr = VBITS * D // 32
        GS: tl.constexpr = D // NG
        offs_g = tl.arange(0, GP)
        g_mask = offs_g < G
        offs_d = tl.arange(0, D)
        q_rows = (n * G + offs_g) * D  # q is (B, H * G, D); kv head h serves q heads h*G .. h*G+G-1
        q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
        q16 = (q * (sm_scale * LOG2E)).to(tl.float16)  # log2 domain
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        t_begin, t_end = split_range(sp, packed_len_ptr, unit, n_splits)
        for t0 in range(t_begin, t_end, BT):
            offs_t = t0 + tl.arange(0, BT)
            tm = offs_t < t_end
            blk = t0 // KB
            if HAS_POS:  # a store of a mixed-width cache: each token's position; -1 = empty slot
                pos = tl.load(pos_ptr + (n // H) * T_CAP + offs_t, mask=tm, other=-1)
                ok = pos >= 0
            else:
                pos = n_sink + offs_t
                ok = tm
            # keys: codes -> levels -> per-channel (block) or per-token scale/zero -> channel affine -> RoPE
            kc = unpack_tile(kw_ptr + (n * T_CAP + offs_t) * WK, tm, KBITS, D, BT)
            if K_LUT:
                kf = tl.load(klut_ptr + (h * D + offs_d)[None, :] * (1 << KBITS) + kc).to(tl.float32)
            else:
                kf = kc.to(tl.float32)
            if K_TOKEN:
                GSK: tl.constexpr = D // NGK
                szk = (n * T_CAP + offs_t)[:, None] * NGK + tl.arange(0, NGK)[None, :]
                ks = tl.load(ks_ptr + szk, mask=tm[:, None], other=0.0).to(tl.float32)  # (BT, NGK)
                kz = tl.load(kz_ptr + szk, mask=tm[:, None], other=0.0).to(tl.float32)
                k = tl.reshape(tl.reshape(kf, (BT, NGK, GSK)) * ks[:, :, None] + kz[:, :, None], (BT, D))
            else:
                ks = tl.load(ks_ptr + (n * NB_CAP + blk) * D + offs_d).to(tl.float32)
                kz = tl.load(kz_ptr + (n * NB_CAP + blk) * D + offs_d).to(tl.float32)
                k = kf * ks[None, :] + kz[None, :]
            if K_CHAN:  # stored (k - shift) / scale: back before RoPE (pre-RoPE scales need not commute with it)
                k = k * tl.load(kch_ptr + h * D + offs_d)[None, :] + tl.load(kch_ptr + (H + h) * D + offs_d)[None, :]
            if PRE_ROPE:
                k = _rope_tile(k, pos, invf_ptr, D, BT, ASM)
            s = tl.dot(q16, tl.trans(k.to(tl.float16)))  # (GP, BT)
            if HAS_OL:
                s = _outlier_scores(s, t0, blk, n, q_ptr, q_rows, g_mask, olp_ptr, olt_ptr, olc_ptr, olv_ptr,
                                    invf_ptr, sm_scale, n_sink, OL_NB, OL_CAP, PRE_ROPE, D, BT, OL_CHUNK, ASM)
            s = tl.where(tm[None, :], s, float("-inf"))
            # empty slots: finite, so that a tile of only empty slots keeps the online softmax finite
            s = tl.where(ok[None, :], s, -1.0e30)
            # values: codes -> levels -> per-token group scale/zero
            vc = unpack_tile(vw_ptr + (n * T_CAP + offs_t) * WV, tm, VBITS, D, BT)
            if V_LUT:
                vf = tl.load(vlut_ptr + (h * D + offs_d)[None, :] * (1 << VBITS) + vc).to(tl.float32)
            else:
                vf = vc.to(tl.float32)
            sz = (n * T_CAP + offs_t)[:, None] * NG + tl.arange(0, NG)[None, :]
            vs = tl.load(vs_ptr + sz, mask=tm[:, None], other=0.0).to(tl.float32)  # (BT, NG)
            vz = tl.load(vz_ptr + sz, mask=tm[:, None], other=0.0).to(tl.float32)
            v = tl.reshape(tl.reshape(vf, (BT, NG, GS)) * vs[:, :, None] + vz[:, :, None], (BT, D))
            m_i, l_i, alpha, p16 = softmax_step(s, m_i, l_i)
            acc = acc * alpha[:, None] + tl.dot(p16, v.to(tl.float16))
            if HAS_VOL:  # the sparse value outliers go to the output, not into the value tile
                acc = _value_outliers(acc, p16, t0, blk, n, vop_ptr, vot_ptr, voc_ptr, vov_ptr, VOL_NB1, VOL_CAP, D,
                                      BT, OL_CHUNK)
        if V_CHAN:  # values stored as (v - shift) / scale: folded into the output, shift + scale * acc / l
            acc = acc * tl.load(vch_ptr + h * D + offs_d)[None, :] + \
                tl.load(vch_ptr + (H + h) * D + offs_d)[None, :] * l_i[:, None]
        store_partial(o_ptr, lse_ptr, n * G + offs_g, g_mask, sp, n_splits, m_i, l_i, acc, D)


def applies(kv, G: int) -> bool:
    return True


def check_ol_chunk(ol_chunk: int) -> None:
    """``ol_chunk`` must be a power of two (the length of a ``tl.arange``) of at least 16 (the K of the fp16
    ``tl.dot`` that adds the entries: an NVIDIA GPU's least; the interpreter would take 8)."""
    if ol_chunk < 16 or ol_chunk & (ol_chunk - 1):
        raise ValueError(f"ol_chunk must be a power of two of at least 16, got {ol_chunk}")


def launch(q, kv, sm_scale: float, tile: int, num_warps: int, num_stages: int, waves: int, n_splits=None,
           ol_chunk: int = 32):
    """``ol_chunk``: sparse outlier entries (keys' or values') added per step of a tile's loop over its key
    block's entries (:func:`check_ol_chunk`)."""
    check_ol_chunk(ol_chunk)
    B, Hq, D = q.shape
    H = kv.k_words.shape[1]
    plan = split_plan(q, kv, tile, tile, B * H, waves, n_splits)
    dmy = dummy(q.device)
    has_ol, has_vol = kv.ol_ptr is not None, kv.vol_ptr is not None
    if has_ol and (kv.positions is not None or kv.k_chan is not None):
        raise ValueError("sparse key outliers combine with neither token positions nor a key channel affine")
    opt = lambda t: dmy if t is None else t  # noqa: E731
    _split_k_kernel[(B * H, plan.grid_splits)](
        *launch_args(q, kv, plan, sm_scale),
        opt(kv.k_lut), opt(kv.v_lut),
        *((kv.ol_ptr, kv.ol_tok, kv.ol_ch, kv.ol_val) if has_ol else (dmy,) * 4),
        opt(kv.inv_freq), H, kv.ol_tok.shape[2] if has_ol else 0,
        opt(kv.positions), opt(kv.k_chan), opt(kv.v_chan),
        *((kv.vol_ptr, kv.vol_tok, kv.vol_ch, kv.vol_val) if has_vol else (dmy,) * 4),
        kv.vol_tok.shape[2] if has_vol else 0, kv.ol_ptr.shape[2] - 1 if has_ol else 0,
        kv.vol_ptr.shape[2] if has_vol else 0,
        G=Hq // H, GP=max(16, triton.next_power_of_2(Hq // H)), D=D, KBITS=kv.key_bits, VBITS=kv.value_bits,
        KB=kv.key_block, BT=tile, NG=kv.v_scale.shape[-1], K_LUT=kv.k_lut is not None,
        V_LUT=kv.v_lut is not None, PRE_ROPE=kv.inv_freq is not None, HAS_OL=has_ol,
        NGK=kv.k_scale.shape[-1] if kv.key_axis == "token" else 1, K_TOKEN=kv.key_axis == "token",
        HAS_POS=kv.positions is not None, K_CHAN=kv.k_chan is not None, V_CHAN=kv.v_chan is not None,
        HAS_VOL=has_vol, ASM=use_inline_ptx(q.device), OL_CHUNK=ol_chunk, num_warps=num_warps,
        num_stages=num_stages,
    )
    return plan


def launch_parts(q, parts, sm_scale: float, **tuning) -> SplitPlan:
    """A mixed-width cache (one :class:`~kvbench.kernels.ops.PackedKV` per store): one launch per store, the
    partial outputs of all of them in one plan for the one reduction. Only the first store holds the sink
    and recent tokens (the others' fp16 splits are empty)."""
    plans = [launch(q, part, sm_scale, **tuning) for part in parts]
    o_part = torch.cat([p.o_part for p in plans], 1)
    return SplitPlan(o_part.shape[1] - 1, o_part, torch.cat([p.lse for p in plans], 1))
