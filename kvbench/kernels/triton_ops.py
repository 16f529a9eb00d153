"""Triton kernels, each with the signature of its twin in :mod:`kvbench.kernels.reference`.

Kernels work on contiguous ``(B, H, T, ...)`` buffers (the cache allocates them so); on a CPU they
run only under ``TRITON_INTERPRET=1`` (slow: about 1 ms per program instance).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import SCALE_FLOOR, bit_slices, words_per_token

_FLOOR = tl.constexpr(SCALE_FLOOR)
_LOG2E = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------------------------
# In-register pack / unpack of one tile (shared by all kernels)
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
def _unpack_tile(row_ptr, mask, BITS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
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
def _pack_tile(code, row_ptr, mask, BITS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    if BITS & 8:
        _pack_slice(code, row_ptr, mask, 0, 0, 8, D, BT)
    if BITS & 4:
        _pack_slice(code, row_ptr, mask, BITS & 8, D * (BITS & 8) // 32, 4, D, BT)
    if BITS & 2:
        _pack_slice(code, row_ptr, mask, BITS & 12, D * (BITS & 12) // 32, 2, D, BT)
    if BITS & 1:
        _pack_slice(code, row_ptr, mask, BITS & 14, D * (BITS & 14) // 32, 1, D, BT)


# ----------------------------------------------------------------------------------------------
# pack / unpack
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pack_kernel(c_ptr, w_ptr, n_rows, BITS: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    m = rows < n_rows
    code = tl.load(c_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], mask=m[:, None], other=0).to(tl.int32)
    _pack_tile(code, w_ptr + rows * W, m, BITS, D, BT)


@triton.jit
def _unpack_kernel(w_ptr, c_ptr, n_rows, BITS: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    m = rows < n_rows
    code = _unpack_tile(w_ptr + rows * W, m, BITS, D, BT)
    tl.store(c_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], code, mask=m[:, None])


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Triton twin of :func:`kvbench.kernels.reference.pack_codes`."""
    d = codes.shape[-1]
    w = words_per_token(bits, d)
    c = codes.reshape(-1, d).to(torch.int32).contiguous()
    out = torch.empty(c.shape[0], w, dtype=torch.int32, device=c.device)
    bt = 16
    _pack_kernel[(triton.cdiv(c.shape[0], bt),)](c, out, c.shape[0], BITS=bits, D=d, W=w, BT=bt)
    return out.reshape(*codes.shape[:-1], w)


def unpack_codes(words: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Triton twin of :func:`kvbench.kernels.reference.unpack_codes`."""
    w = words.shape[-1]
    ws = words.reshape(-1, w).contiguous()
    out = torch.empty(ws.shape[0], head_dim, dtype=torch.int32, device=ws.device)
    bt = 16
    _unpack_kernel[(triton.cdiv(ws.shape[0], bt),)](ws, out, ws.shape[0], BITS=bits, D=head_dim, W=w, BT=bt)
    return out.reshape(*words.shape[:-1], head_dim)


# ----------------------------------------------------------------------------------------------
# Quantize and pack
# ----------------------------------------------------------------------------------------------
@triton.jit
def _nearest(xn, lut_ptr, lut_off, NC: tl.constexpr):
    """Index of the nearest centroid (first on ties); ``lut_off`` broadcasts like ``xn``."""
    best = tl.abs(xn - tl.load(lut_ptr + lut_off).to(tl.float32))
    code = tl.zeros(xn.shape, tl.int32)
    for k in tl.static_range(1, NC):
        dist = tl.abs(xn - tl.load(lut_ptr + lut_off + k).to(tl.float32))
        better = dist < best
        code = tl.where(better, k, code)
        best = tl.where(better, dist, best)
    return code


@triton.jit
def _quant_keys_kernel(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, clo_ptr, chi_ptr, gs_ptr, gz_ptr,
                       H, T, NB,
                       BITS: tl.constexpr, D: tl.constexpr, W: tl.constexpr, KB: tl.constexpr,
                       HAS_LUT: tl.constexpr, CLAMP: tl.constexpr, GIVEN: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # b * H + h
    blk = tl.program_id(1)
    h = n % H
    QMAX: tl.constexpr = (1 << BITS) - 1
    offs_t = blk * KB + tl.arange(0, KB)
    offs_d = tl.arange(0, D)
    x = tl.load(x_ptr + (n * T + offs_t)[:, None] * D + offs_d[None, :]).to(tl.float32)  # (KB, D)
    if CLAMP:
        lo_t = tl.load(clo_ptr + h * D + offs_d).to(tl.float32)
        hi_t = tl.load(chi_ptr + h * D + offs_d).to(tl.float32)
        x = tl.maximum(tl.minimum(x, hi_t[None, :]), lo_t[None, :])
    if GIVEN:
        s = tl.maximum(tl.load(gs_ptr + h * D + offs_d).to(tl.float32), _FLOOR)
        z = tl.load(gz_ptr + h * D + offs_d).to(tl.float32)
    else:
        lo = tl.min(x, axis=0)
        hi = tl.max(x, axis=0)
        s = tl.maximum(tl.div_rn(hi - lo, QMAX * 1.0), _FLOOR)
        z = lo
    s16 = s.to(tl.float16)
    z16 = z.to(tl.float16)
    tl.store(s_ptr + (n * NB + blk) * D + offs_d, s16)
    tl.store(z_ptr + (n * NB + blk) * D + offs_d, z16)
    xn = tl.div_rn(x - z16.to(tl.float32)[None, :], s16.to(tl.float32)[None, :])
    if HAS_LUT:
        code = _nearest(xn, lut_ptr, (h * D + offs_d)[None, :] * (QMAX + 1), QMAX + 1)
    else:
        code = tl.minimum(tl.maximum(tl.floor(xn + 0.5), 0.0), QMAX * 1.0).to(tl.int32)
    _pack_tile(code, w_ptr + (n * T + offs_t) * W, offs_t < T, BITS, D, KB)


@triton.jit
def _quant_values_kernel(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, H, T,
                         BITS: tl.constexpr, D: tl.constexpr, W: tl.constexpr, G: tl.constexpr,
                         BT: tl.constexpr, HAS_LUT: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = n % H
    QMAX: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = D // G
    offs_t = tl.program_id(1) * BT + tl.arange(0, BT)
    m = offs_t < T
    offs_d = tl.arange(0, D)
    x = tl.load(x_ptr + (n * T + offs_t)[:, None] * D + offs_d[None, :], mask=m[:, None], other=0.0)
    x3 = tl.reshape(x.to(tl.float32), (BT, NG, G))
    lo = tl.min(x3, axis=2)
    hi = tl.max(x3, axis=2)  # (BT, NG)
    s16 = tl.maximum(tl.div_rn(hi - lo, QMAX * 1.0), _FLOOR).to(tl.float16)
    z16 = lo.to(tl.float16)
    offs_g = tl.arange(0, NG)
    sz_off = (n * T + offs_t)[:, None] * NG + offs_g[None, :]
    tl.store(s_ptr + sz_off, s16, mask=m[:, None])
    tl.store(z_ptr + sz_off, z16, mask=m[:, None])
    xn = tl.div_rn(x3 - z16.to(tl.float32)[:, :, None], s16.to(tl.float32)[:, :, None])
    xn = tl.reshape(xn, (BT, D))
    if HAS_LUT:
        code = _nearest(xn, lut_ptr, (h * D + offs_d)[None, :] * (QMAX + 1), QMAX + 1)
    else:
        code = tl.minimum(tl.maximum(tl.floor(xn + 0.5), 0.0), QMAX * 1.0).to(tl.int32)
    _pack_tile(code, w_ptr + (n * T + offs_t) * W, m, BITS, D, BT)


def _dummy(device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.float16, device=device)


def quantize_pack_keys(x, bits, block, lut=None, clamp_lo=None, clamp_hi=None, scale=None, zero=None):
    """Triton twin of :func:`kvbench.kernels.reference.quantize_pack_keys`."""
    B, H, T, D = x.shape
    if T % block:
        raise ValueError(f"T={T} is not a multiple of the key block {block}")
    x = x.contiguous()
    w = words_per_token(bits, D)
    nb = T // block
    words = torch.empty(B, H, T, w, dtype=torch.int32, device=x.device)
    s = torch.empty(B, H, nb, D, dtype=torch.float16, device=x.device)
    z = torch.empty_like(s)
    dmy = _dummy(x.device)
    _quant_keys_kernel[(B * H, nb)](
        x, words, s, z,
        dmy if lut is None else lut.contiguous(),
        dmy if clamp_lo is None else clamp_lo.contiguous(),
        dmy if clamp_hi is None else clamp_hi.contiguous(),
        dmy if scale is None else scale.contiguous(),
        dmy if zero is None else zero.contiguous(),
        H, T, nb, BITS=bits, D=D, W=w, KB=block,
        HAS_LUT=lut is not None, CLAMP=clamp_lo is not None, GIVEN=scale is not None,
    )
    return words, s, z


def quantize_pack_values(x, bits, group, lut=None):
    """Triton twin of :func:`kvbench.kernels.reference.quantize_pack_values`."""
    B, H, T, D = x.shape
    x = x.contiguous()
    w = words_per_token(bits, D)
    words = torch.empty(B, H, T, w, dtype=torch.int32, device=x.device)
    s = torch.empty(B, H, T, D // group, dtype=torch.float16, device=x.device)
    z = torch.empty_like(s)
    bt = 16
    _quant_values_kernel[(B * H, triton.cdiv(T, bt))](
        x, words, s, z, _dummy(x.device) if lut is None else lut.contiguous(), H, T,
        BITS=bits, D=D, W=w, G=group, BT=bt, HAS_LUT=lut is not None,
    )
    return words, s, z


# ----------------------------------------------------------------------------------------------
# Decode attention: split-K over the packed tokens + one split for the fp16 sink/recent tokens
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rope_tile(k, pos, inv_freq_ptr, D: tl.constexpr, BT: tl.constexpr):
    """Rotate a ``(BT, D)`` fp32 key tile at positions ``pos (BT,)`` (HF rotate_half)."""
    HALF: tl.constexpr = D // 2
    inv = tl.load(inv_freq_ptr + tl.arange(0, HALF))
    ang = pos.to(tl.float32)[:, None] * inv[None, :]  # (BT, D/2)
    c = tl.cos(ang)
    s = tl.sin(ang)
    k1, k2 = tl.split(tl.permute(tl.reshape(k, (BT, 2, HALF)), (0, 2, 1)))
    r = tl.join(k1 * c - k2 * s, k2 * c + k1 * s)  # (BT, D/2, 2)
    return tl.reshape(tl.permute(r, (0, 2, 1)), (BT, D))


@triton.jit
def _online(s, v16, m_i, l_i, acc):
    """One online-softmax step (log2 domain) for scores ``s (GP, BT)`` and values ``(BT, D)``."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v16)
    return m_new, l_i, acc


@triton.jit
def _fp16_part(q16, k_ptr, v_ptr, n_tok, m_i, l_i, acc, D: tl.constexpr, BTF: tl.constexpr):
    offs_d = tl.arange(0, D)
    for t0 in range(0, n_tok, BTF):
        offs_t = t0 + tl.arange(0, BTF)
        m = offs_t < n_tok
        ptr = offs_t[:, None] * D + offs_d[None, :]
        k = tl.load(k_ptr + ptr, mask=m[:, None], other=0.0).to(tl.float16)
        v = tl.load(v_ptr + ptr, mask=m[:, None], other=0.0).to(tl.float16)
        s = tl.dot(q16, tl.trans(k))
        s = tl.where(m[None, :], s, float("-inf"))
        m_i, l_i, acc = _online(s, v, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, klut_ptr, vlut_ptr,
    sk_ptr, sv_ptr, rk_ptr, rv_ptr, olp_ptr, olt_ptr, olc_ptr, olv_ptr, invf_ptr,
    o_ptr, lse_ptr,
    sm_scale, H, T_CAP, NB_CAP, S_CAP, R_CAP, OL_CAP,
    n_packed, n_sink, n_recent, tiles_per_split, n_splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
    KB: tl.constexpr, BT: tl.constexpr, NG: tl.constexpr,
    K_LUT: tl.constexpr, V_LUT: tl.constexpr, PRE_ROPE: tl.constexpr, HAS_OL: tl.constexpr,
    OL_CHUNK: tl.constexpr, BTF: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # b * H + h
    sp = tl.program_id(1)
    S1 = n_splits + 1
    h = n % H
    WK: tl.constexpr = KBITS * D // 32
    WV: tl.constexpr = VBITS * D // 32
    GS: tl.constexpr = D // NG
    KNC: tl.constexpr = 1 << KBITS
    HALF: tl.constexpr = D // 2
    VNC: tl.constexpr = 1 << VBITS
    offs_g = tl.arange(0, GP)
    g_mask = offs_g < G
    offs_d = tl.arange(0, D)
    q_rows = (n * G + offs_g) * D  # q is (B, H * G, D); kv head h serves q heads h*G .. h*G+G-1
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
    q = q * (sm_scale * _LOG2E)  # log2 domain
    q16 = q.to(tl.float16)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    if sp < n_splits:
        t_begin = sp * tiles_per_split * BT
        t_end = tl.minimum(t_begin + tiles_per_split * BT, n_packed)
        for t0 in range(t_begin, t_end, BT):
            offs_t = t0 + tl.arange(0, BT)
            tm = offs_t < t_end
            blk = t0 // KB
            # keys: codes -> levels -> per-channel (block) scale/zero -> optional RoPE
            kc = _unpack_tile(kw_ptr + (n * T_CAP + offs_t) * WK, tm, KBITS, D, BT)
            if K_LUT:
                kf = tl.load(klut_ptr + (h * D + offs_d)[None, :] * KNC + kc).to(tl.float32)
            else:
                kf = kc.to(tl.float32)
            ks = tl.load(ks_ptr + (n * NB_CAP + blk) * D + offs_d).to(tl.float32)
            kz = tl.load(kz_ptr + (n * NB_CAP + blk) * D + offs_d).to(tl.float32)
            k = kf * ks[None, :] + kz[None, :]
            if PRE_ROPE:
                k = _rope_tile(k, n_sink + offs_t, invf_ptr, D, BT)
            s = tl.dot(q16, tl.trans(k.to(tl.float16)))  # (GP, BT)
            if HAS_OL:
                # sparse outliers of this block: residuals (pre-RoPE) at (token, channel)
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
                        ang = (n_sink + tok).to(tl.float32) * tl.load(invf_ptr + ch % HALF)
                        qp = tl.load(q_ptr + q_rows[:, None] + pair[None, :], mask=qm, other=0.0).to(tl.float32)
                        contrib = val[None, :] * (qd * tl.cos(ang)[None, :] + sign[None, :] * qp * tl.sin(ang)[None, :])
                    else:
                        contrib = qd * val[None, :]
                    contrib = contrib * (sm_scale * _LOG2E)  # (GP, CHUNK)
                    onehot = ((tok - t0)[:, None] == tl.arange(0, BT)[None, :]).to(tl.float16)  # (CHUNK, BT)
                    s += tl.dot(contrib.to(tl.float16), onehot)
            s = tl.where(tm[None, :], s, float("-inf"))
            # values: codes -> levels -> per-token group scale/zero
            vc = _unpack_tile(vw_ptr + (n * T_CAP + offs_t) * WV, tm, VBITS, D, BT)
            if V_LUT:
                vf = tl.load(vlut_ptr + (h * D + offs_d)[None, :] * VNC + vc).to(tl.float32)
            else:
                vf = vc.to(tl.float32)
            sz = (n * T_CAP + offs_t)[:, None] * NG + tl.arange(0, NG)[None, :]
            vs = tl.load(vs_ptr + sz, mask=tm[:, None], other=0.0).to(tl.float32)  # (BT, NG)
            vz = tl.load(vz_ptr + sz, mask=tm[:, None], other=0.0).to(tl.float32)
            v3 = tl.reshape(vf, (BT, NG, GS)) * vs[:, :, None] + vz[:, :, None]
            v = tl.reshape(v3, (BT, D)).to(tl.float16)
            m_i, l_i, acc = _online(s, v, m_i, l_i, acc)
    else:
        m_i, l_i, acc = _fp16_part(q16, sk_ptr + n * S_CAP * D, sv_ptr + n * S_CAP * D, n_sink,
                                   m_i, l_i, acc, D, BTF)
        m_i, l_i, acc = _fp16_part(q16, rk_ptr + n * R_CAP * D, rv_ptr + n * R_CAP * D, n_recent,
                                   m_i, l_i, acc, D, BTF)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    rows = n * G + offs_g  # (b, q head) rows
    tl.store(o_ptr + (rows[:, None] * S1 + sp) * D + offs_d[None, :], out, mask=g_mask[:, None])
    tl.store(lse_ptr + rows * S1 + sp, lse, mask=g_mask)


# ----------------------------------------------------------------------------------------------
# Decode attention, CUDA-core path "fma" (uniform codes, post-RoPE keys, no outliers, per-token values)
#
# Every tile is a ``(BT, NW)`` tile of int32 words (one token per row, NW words of one bit slice).
# Field ``j`` of every word is extracted with compile-time shifts only: a (shared) shift moves a
# group of fields into bits ``LOWP..22`` of an fp32 mantissa, one LOP3 masks the field and ORs the
# exponent of 1.0, so ``f = 1 + code * 2**(POS - 23)`` (exact) with no int->float conversion. The
# fields are joined (``tl.join``, in-thread) into a ``(BT, NW, CPW)`` tile whose flattened last two
# axes are the channels in storage order (``w * CPW + j``), so the per-block key scales and the
# query load as plain contiguous ``(NW, CPW)`` tiles in the same layout.
#   keys:   score_t = sum_c qf_c f_tc + bias, qf = q * scale * 2**(23-POS) (folded once per key
#           block), bias = sum_c q_c zero_c - sum_c qf_c; the reduction over channels is in-thread
#           except for the NW / VEC lanes a token's words are spread over.
#   values: acc[t, c] += (p_t s_t) f_tc in fp32 per (token row, channel) of the tile, reduced over
#           the token rows only once per program; out_c = 2**(23-POS)(acc_c - sum p s) + sum p z.
# Softmax rescaling is lazy (only when a tile's max exceeds the running max by more than 8 in log2).
# ----------------------------------------------------------------------------------------------
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
def _pair(words, J: tl.constexpr, WIDTH: tl.constexpr, SUB: tl.constexpr, ASM: tl.constexpr):
    """fp32 fields ``J`` and ``J + 16 // WIDTH`` of uint32 ``words`` by the fp16x2 magic number: one shift and
    one LOP3 ``(w >> J*WIDTH) & M | 0x64006400`` give two fp16 ``1024 + code`` (exact); with ``SUB`` one
    ``sub.f16x2`` of 0x64006400 leaves the exact codes; ``cvt.f32.f16`` per half (``ASM``: inline PTX; else
    the same values in plain Triton for the interpreter). Returns ``(lo, hi)``: ``OFF + code``, ``OFF`` 0 or 1024."""
    SH: tl.constexpr = J * WIDTH
    M: tl.constexpr = ((1 << WIDTH) - 1) * 0x00010001
    if SH > 0:
        x = words >> SH
    else:
        x = words
    if ASM:
        t = (x & M) | 0x64006400
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
        lo = (x & ((1 << WIDTH) - 1)).to(tl.float32) + OFF
        hi = ((x >> 16) & ((1 << WIDTH) - 1)).to(tl.float32) + OFF
        return lo, hi


@triton.jit
def _field(words, J: tl.constexpr, WIDTH: tl.constexpr, LOWP: tl.constexpr, MODE: tl.constexpr = 0):
    """fp32 ``OFF + code_j * 2**-FAC`` of field ``J`` of uint32 ``words`` (``OFF``, ``FAC``: see ``_fac``).

    ``MODE`` 0: a (shared) shift moves the field to bits ``POS..POS+WIDTH-1``, one LOP3 masks it and ORs the
    exponent of 1.0 (``OFF`` 1). ``MODE`` 1/2 (``WIDTH`` <= 4): a shift + mask shared by the 4 fields at the
    same offset ``R`` of every byte moves them to bits ``7-WIDTH..6`` of their byte, then one byte permute
    (PRMT, inline PTX with ``MODE`` 2, emulated with ``MODE`` 1) places byte ``K`` into mantissa bits 16..23
    under exponent byte 0x3F: ``f = 0.5 + code * 2**-(WIDTH+1)`` (``OFF`` 0.5), two constants in all."""
    if MODE == 0:
        L: tl.constexpr = (23 - LOWP) // WIDTH * WIDTH
        O: tl.constexpr = J * WIDTH
        SH: tl.constexpr = LOWP - (O // L) * L
        POS: tl.constexpr = O + SH
        MASK: tl.constexpr = ((1 << WIDTH) - 1) << POS
        if SH > 0:
            x = words << SH
        elif SH < 0:
            x = words >> (-SH)
        else:
            x = words
        return ((x & MASK) | 0x3F800000).to(tl.float32, bitcast=True)
    else:
        O2: tl.constexpr = J * WIDTH
        K: tl.constexpr = O2 // 8
        SB: tl.constexpr = (7 - WIDTH) - O2 % 8
        BMASK: tl.constexpr = (((1 << WIDTH) - 1) << (7 - WIDTH)) * 0x01010101
        if SB > 0:
            x2 = words << SB
        elif SB < 0:
            x2 = words >> (-SB)
        else:
            x2 = words
        return _prmt_byte(x2 & BMASK, K, MODE == 2)


@triton.jit
def _fields_joined(words, J0: tl.constexpr, STEP: tl.constexpr, CNT: tl.constexpr, WIDTH: tl.constexpr,
                   LOWP: tl.constexpr, MODE: tl.constexpr = 0, VAL: tl.constexpr = False):
    """Fields ``J0, J0 + STEP, ...`` (CNT of them) joined along new trailing axes (bit-reversed)."""
    if CNT == 1:
        return _field(words, J0, WIDTH, LOWP, MODE)
    elif MODE >= 3 and CNT == 2:  # fields J0 and J0 + 16 // WIDTH (= STEP here): one fp16x2 magic pair
        lo, hi = _pair(words, J0, WIDTH, VAL or MODE == 4 or MODE == 6, MODE <= 4)
        return tl.join(lo, hi)
    else:
        return tl.join(_fields_joined(words, J0, 2 * STEP, CNT // 2, WIDTH, LOWP, MODE, VAL),
                       _fields_joined(words, J0 + STEP, 2 * STEP, CNT // 2, WIDTH, LOWP, MODE, VAL))


@triton.jit
def _fields_tile(words, WIDTH: tl.constexpr, LOWP: tl.constexpr, BT: tl.constexpr, NW: tl.constexpr,
                 MODE: tl.constexpr = 0, VAL: tl.constexpr = False):
    """``(BT, NW)`` int32 words -> ``(BT, NW, CPW)`` fp32 fields (channel ``w * CPW + j``); ``VAL``: value
    fields (``MODE`` >= 3: exact codes, ``OFF`` 0)."""
    CPW: tl.constexpr = 32 // WIDTH
    f = _fields_joined(words.to(tl.uint32, bitcast=True), 0, 1, CPW, WIDTH, LOWP, MODE, VAL)
    return tl.reshape(f, (BT, NW, CPW))


@triton.jit
def _kdot(words, qf, s2, J0: tl.constexpr, STEP: tl.constexpr, CNT: tl.constexpr, WIDTH: tl.constexpr,
          LOWP: tl.constexpr, MODE: tl.constexpr = 0):
    """``s2 (BT, NW) += sum_j f_j * qf_j``: a chain of FMAs over the fields of uint32 ``words``.

    ``qf (NW, 2, ..., 2)`` holds the folded query in the bit-reversed order of ``_fields_joined``
    (split back in registers with ``tl.split``)."""
    if CNT == 1:
        return s2 + _field(words, J0, WIDTH, LOWP, MODE) * qf[None, :]
    elif MODE >= 3 and CNT == 2:
        qa, qb = tl.split(qf)
        lo, hi = _pair(words, J0, WIDTH, MODE == 4 or MODE == 6, MODE <= 4)
        return s2 + lo * qa[None, :] + hi * qb[None, :]
    else:
        qa, qb = tl.split(qf)
        s2 = _kdot(words, qa, s2, J0, 2 * STEP, CNT // 2, WIDTH, LOWP, MODE)
        return _kdot(words, qb, s2, J0 + STEP, 2 * STEP, CNT // 2, WIDTH, LOWP, MODE)


@triton.jit
def _kscore(words, qf, WIDTH: tl.constexpr, LOWP: tl.constexpr, MODE: tl.constexpr = 0):
    """Scores ``(BT,)`` of ``(BT, NW)`` int32 key words against a ``_kdot``-ordered folded query."""
    CPW: tl.constexpr = 32 // WIDTH
    wu = words.to(tl.uint32, bitcast=True)
    s2 = _kdot(wu, qf, (words * 0).to(tl.float32), 0, 1, CPW, WIDTH, LOWP, MODE)
    return tl.sum(s2, axis=1)


@triton.jit
def _bitrev(x, NW: tl.constexpr, CPW: tl.constexpr):
    """``(NW, CPW)`` -> ``(NW, 2, ..., 2)`` (the shape ``_fields_joined`` builds, same element order)."""
    if CPW == 4:
        return tl.reshape(x, (NW, 2, 2))
    elif CPW == 8:
        return tl.reshape(x, (NW, 2, 2, 2))
    elif CPW == 16:
        return tl.reshape(x, (NW, 2, 2, 2, 2))
    else:
        return tl.reshape(x, (NW, 2, 2, 2, 2, 2))


@triton.jit
def _fac(WIDTH: tl.constexpr, LOWP: tl.constexpr, NW: tl.constexpr, MODE: tl.constexpr = 0):
    """``(NW, CPW)`` fp32 ``2**FAC_j``: the factor that turns ``f - OFF`` back into the code
    (``MODE`` 0: ``2**(23 - POS_j)``, ``OFF`` 1; ``MODE`` 1/2: ``2**(WIDTH + 1)``, ``OFF`` 0.5)."""
    CPW: tl.constexpr = 32 // WIDTH
    L: tl.constexpr = (23 - LOWP) // WIDTH * WIDTH
    o = tl.arange(0, CPW) * WIDTH
    pos = o - (o // L) * L + LOWP
    if MODE >= 3:
        pos = pos * 0 + 23  # fp16x2 magic: the fields are OFF + code
    elif MODE != 0:
        pos = pos * 0 + (22 - WIDTH)
    fac = tl.exp2((23 - pos).to(tl.float32))
    return tl.broadcast_to(fac[None, :], (NW, CPW))


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
def _decode_fma_kernel(
    q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr,
    sm_scale, T_CAP, NB_CAP, S_CAP, R_CAP, n_packed, n_sink, n_recent, tiles_per_split, n_splits,
    G: tl.constexpr, D: tl.constexpr, KW0: tl.constexpr, KW1: tl.constexpr,
    VW0: tl.constexpr, VW1: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, BTF: tl.constexpr,
    VEC: tl.constexpr, LOWP: tl.constexpr, LOWPV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b, q head); one program per query head and split
    n = row // G  # b * H + h: the kv head it reads
    sp = tl.program_id(1)
    S1 = n_splits + 1
    qscale = sm_scale * _LOG2E
    offs_d = tl.arange(0, D)
    if sp < n_splits:
        WK: tl.constexpr = (KW0 + KW1) * D // 32
        WV: tl.constexpr = (VW0 + VW1) * D // 32
        NK0: tl.constexpr = KW0 * D // 32
        CK0: tl.constexpr = 32 // KW0
        NV0: tl.constexpr = VW0 * D // 32
        NK1: tl.constexpr = KW1 * D // 32
        NV1: tl.constexpr = VW1 * D // 32
        t_begin = sp * tiles_per_split * BT
        t_end = tl.minimum(t_begin + tiles_per_split * BT, n_packed)
        # loop-carried tiles start as zeros in the layout of the field tiles (no layout conversions)
        offs_t = t_begin + tl.arange(0, BT)
        tm = offs_t < t_end
        krow = kw_ptr + (n * T_CAP + offs_t) * WK
        vrow = vw_ptr + (n * T_CAP + offs_t) * WV
        wk0 = _word_tile(krow, tm, 0, NK0, VEC)
        z_k0 = _fields_joined(wk0.to(tl.uint32, bitcast=True), 0, 1, CK0, KW0, LOWP) * 0.0
        qf0 = tl.sum(z_k0, axis=0)  # (NW, 2, ..., 2)
        acc0 = _fields_tile(_word_tile(vrow, tm, 0, NV0, VEC), VW0, LOWPV, BT, NV0) * 0.0
        ck0 = _chan(NK0, CK0)
        qs0 = tl.load(q_ptr + row * D + ck0).to(tl.float32) * qscale  # (NW, CPW)
        fk0 = _fac(KW0, LOWP, NK0)
        if KW1 > 0:
            CK1: tl.constexpr = 32 // KW1
            wk1 = _word_tile(krow, tm, NK0, NK1, VEC)
            qf1 = tl.sum(_fields_joined(wk1.to(tl.uint32, bitcast=True), 0, 1, CK1, KW1, LOWP) * 0.0, axis=0)
            ck1 = _chan(NK1, CK1)
            qs1 = tl.load(q_ptr + row * D + ck1).to(tl.float32) * qscale
            fk1 = _fac(KW1, LOWP, NK1) * (1 << KW0)
        if VW1 > 0:
            acc1 = _fields_tile(_word_tile(vrow, tm, NV0, NV1, VEC), VW1, LOWPV, BT, NV1) * 0.0
        z_t = _kscore(wk0, qf0, KW0, LOWP)  # (BT,) zeros in the layout of the scores
        bias = tl.sum(z_t, axis=0)
        m_i = bias - float("inf")
        l_t = z_t  # per token row: sum p, sum p * s, sum p * z
        ps_t = z_t
        pz_t = z_t
        for t0 in range(t_begin, t_end, BT):
            if t0 % KB == 0:  # new key block: fold its scales into the query, its zeros into a bias
                kb = (n * NB_CAP + t0 // KB) * D
                qf = qs0 * tl.load(ks_ptr + kb + ck0).to(tl.float32) * fk0  # (NW, CPW)
                bias = tl.sum(tl.sum(qs0 * tl.load(kz_ptr + kb + ck0).to(tl.float32) - qf, axis=1), axis=0)
                qf0 = _bitrev(qf, NK0, CK0)
                if KW1 > 0:
                    qf = qs1 * tl.load(ks_ptr + kb + ck1).to(tl.float32) * fk1
                    bias -= tl.sum(tl.sum(qf, axis=1), axis=0)
                    qf1 = _bitrev(qf, NK1, CK1)
            offs_t = t0 + tl.arange(0, BT)
            tm = offs_t < t_end
            krow = kw_ptr + (n * T_CAP + offs_t) * WK
            s = _kscore(_word_tile(krow, tm, 0, NK0, VEC), qf0, KW0, LOWP)  # (BT,)
            if KW1 > 0:
                s += _kscore(_word_tile(krow, tm, NK0, NK1, VEC), qf1, KW1, LOWP)
            s = tl.where(tm, s + bias, float("-inf"))
            m_t = tl.max(s, axis=0)
            if m_t - m_i > 8.0:  # lazy rescale
                alpha = tl.exp2(m_i - m_t)
                l_t = l_t * alpha
                ps_t = ps_t * alpha
                pz_t = pz_t * alpha
                acc0 = acc0 * alpha
                if VW1 > 0:
                    acc1 = acc1 * alpha
                m_i = m_t
            p = tl.exp2(s - m_i)  # (BT,)
            vsc = tl.load(vs_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)
            vzp = tl.load(vz_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)
            pv = p * vsc
            l_t += p
            ps_t += pv
            pz_t += p * vzp
            vrow = vw_ptr + (n * T_CAP + offs_t) * WV
            fv = _fields_tile(_word_tile(vrow, tm, 0, NV0, VEC), VW0, LOWPV, BT, NV0)
            acc0 += pv[:, None, None] * fv
            if VW1 > 0:
                fv1 = _fields_tile(_word_tile(vrow, tm, NV0, NV1, VEC), VW1, LOWPV, BT, NV1)
                acc1 += pv[:, None, None] * fv1
        l_i = tl.sum(l_t, axis=0)
        sp_i = tl.sum(ps_t, axis=0)
        inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        o = tl.reshape((tl.sum(acc0, axis=0) - sp_i) * _fac(VW0, LOWPV, NV0), (D,))
        if VW1 > 0:
            o1 = (tl.sum(acc1, axis=0) - sp_i) * (_fac(VW1, LOWPV, NV1) * (1 << VW0))
            o += tl.reshape(o1, (D,))
        o = (o + tl.sum(pz_t, axis=0)) * inv_l
        tl.store(o_ptr + (row * S1 + sp) * D + offs_d, o)
    else:
        q = tl.load(q_ptr + row * D + offs_d).to(tl.float32) * qscale  # (D,)
        l_i = tl.sum(q * 0.0, axis=0)
        m_i = l_i - float("inf")
        acc = q * 0.0
        for part in tl.static_range(2):
            if part == 0:
                base_k = sk_ptr + n * S_CAP * D
                base_v = sv_ptr + n * S_CAP * D
                n_tok = n_sink
            else:
                base_k = rk_ptr + n * R_CAP * D
                base_v = rv_ptr + n * R_CAP * D
                n_tok = n_recent
            for t0 in range(0, n_tok, BTF):
                offs_t = t0 + tl.arange(0, BTF)
                tm = offs_t < n_tok
                ptr = offs_t[:, None] * D + offs_d[None, :]
                k = tl.load(base_k + ptr, mask=tm[:, None], other=0.0).to(tl.float32)
                v = tl.load(base_v + ptr, mask=tm[:, None], other=0.0).to(tl.float32)
                qd = tl.load(q_ptr + row * D + offs_d).to(tl.float32) * qscale  # reloaded here: Triton 3.6's
                s = tl.sum(qd[None, :] * k, axis=1)  # layout pass fails on a q defined outside the loop
                s = tl.where(tm, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=0))
                alpha = tl.exp2(m_i - m_new)
                pf = tl.exp2(s - m_new)
                l_i = l_i * alpha + tl.sum(pf, axis=0)
                acc = acc * alpha + tl.sum(pf[:, None] * v, axis=0)
                m_i = m_new
        inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        tl.store(o_ptr + (row * S1 + sp) * D + offs_d, acc * inv_l)
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + row * S1 + sp, lse)


# ----------------------------------------------------------------------------------------------
# Decode attention, grouped CUDA-core path "fmag": the "fma" scheme for single-slice codes (2/4/8 bits)
# with GB (1..4) query heads per program that share each word tile (GQA: the words are read and the
# fields extracted once for GB heads; the heads are unrolled into separate register tiles, so no layout
# conversion), and an optional register prefetch (PREF) of the next tile's words, issued before the
# current tile is computed (one more tile in flight per warp).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gfold(qs, ksb, kzb, NW: tl.constexpr, CPW: tl.constexpr, MODE: tl.constexpr):
    """Fold one key block's scales (``ksb`` premultiplied by ``_fac``) into a query ``qs (NW, CPW)``."""
    qf = qs * ksb
    if MODE == 0:
        bias = tl.sum(tl.sum(qs * kzb - qf, axis=1), axis=0)
    elif MODE == 3 or MODE == 5:  # key fields 1024 + code
        bias = tl.sum(tl.sum(qs * kzb - 1024.0 * qf, axis=1), axis=0)
    elif MODE == 4 or MODE == 6:  # key fields = code
        bias = tl.sum(tl.sum(qs * kzb + 0.0 * qf, axis=1), axis=0)
    else:
        bias = tl.sum(tl.sum(qs * kzb - 0.5 * qf, axis=1), axis=0)
    return _bitrev(qf, NW, CPW), bias


@triton.jit
def _gstep(s, tm, bias, m_i, l_t, ps_t, pz_t, acc, vsc, vzp, fv, acc1, fv1, TWO: tl.constexpr):
    """One tile of one query head: masked scores -> lazy-rescaled softmax -> value accumulators
    (``acc1``/``fv1``: the second value bit slice where ``TWO``)."""
    s = tl.where(tm, s + bias, float("-inf"))
    m_t = tl.max(s, axis=0)
    if m_t - m_i > 8.0:  # lazy rescale
        alpha = tl.exp2(m_i - m_t)
        l_t = l_t * alpha
        ps_t = ps_t * alpha
        pz_t = pz_t * alpha
        acc = acc * alpha
        if TWO:
            acc1 = acc1 * alpha
        m_i = m_t
    p = tl.exp2(s - m_i)
    pv = p * vsc
    l_t += p
    ps_t += pv
    pz_t += p * vzp
    acc += pv[:, None, None] * fv
    if TWO:
        acc1 += pv[:, None, None] * fv1
    return m_i, l_t, ps_t, pz_t, acc, acc1


@triton.jit
def _gfinal(m_i, l_t, ps_t, pz_t, acc, fac, acc1, fac1, o_row, lse_at, D: tl.constexpr, MODE: tl.constexpr,
            TWO: tl.constexpr):
    l_i = tl.sum(l_t, axis=0)
    sp_i = tl.sum(ps_t, axis=0)
    if MODE >= 3:
        sp_i = sp_i * 0.0  # value fields are the exact codes
    elif MODE != 0:
        sp_i = sp_i * 0.5
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = tl.reshape((tl.sum(acc, axis=0) - sp_i) * fac, (D,))
    if TWO:
        o += tl.reshape((tl.sum(acc1, axis=0) - sp_i) * fac1, (D,))
    o = (o + tl.sum(pz_t, axis=0)) / l_safe
    tl.store(o_row + tl.arange(0, D), o)
    tl.store(lse_at, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")))


@triton.jit
def _gload(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, offs_t, t_end, NK: tl.constexpr, NK1: tl.constexpr,
           NV: tl.constexpr, NV1: tl.constexpr, VEC: tl.constexpr, VEC1: tl.constexpr):
    """Words (both bit slices; the first slice again as a placeholder where there is one) and value
    scale / zero of the token rows ``offs_t``, masked at ``t_end``."""
    tm = offs_t < t_end
    krow = kw_ptr + (n * T_CAP + offs_t) * (NK + NK1)
    vrow = vw_ptr + (n * T_CAP + offs_t) * (NV + NV1)
    wk = _word_tile(krow, tm, 0, NK, VEC)
    wv = _word_tile(vrow, tm, 0, NV, VEC)
    if NK1 > 0:
        wk1 = _word_tile(krow, tm, NK, NK1, VEC1)
    else:
        wk1 = wk
    if NV1 > 0:
        wv1 = _word_tile(vrow, tm, NV, NV1, VEC1)
    else:
        wv1 = wv
    vsc = tl.load(vs_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)
    vzp = tl.load(vz_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)
    return wk, wk1, wv, wv1, vsc, vzp


@triton.jit
def _decode_fmag_kernel(
    q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr,
    sm_scale, T_CAP, NB_CAP, S_CAP, R_CAP, n_packed, n_sink, n_recent, tiles_per_split, n_splits,
    G: tl.constexpr, GB: tl.constexpr, D: tl.constexpr, KW: tl.constexpr, VW: tl.constexpr,
    KW1: tl.constexpr, VW1: tl.constexpr, KB: tl.constexpr,
    BT: tl.constexpr, BTF: tl.constexpr, VEC: tl.constexpr, VEC1: tl.constexpr, LOWP: tl.constexpr,
    LOWPV: tl.constexpr, PREF: tl.constexpr, MODE: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * GB  # first (b, q head) row of this program's GB heads
    n = row0 // G  # b * H + h: the kv head they share
    sp = tl.program_id(1)
    S1 = n_splits + 1
    qscale = sm_scale * _LOG2E
    offs_d = tl.arange(0, D)
    if sp < n_splits:
        # slice 0: KW-bit fields (the low bits of the code), slice 1 (KW1 > 0, GB == 1 only): the next KW1 bits
        NK: tl.constexpr = KW * D // 32
        CK: tl.constexpr = 32 // KW
        NV: tl.constexpr = VW * D // 32
        NK1: tl.constexpr = KW1 * D // 32
        NV1: tl.constexpr = VW1 * D // 32
        TWO: tl.constexpr = VW1 > 0
        t_begin = sp * tiles_per_split * BT
        t_end = tl.minimum(t_begin + tiles_per_split * BT, n_packed)
        offs_t = t_begin + tl.arange(0, BT)
        tm = offs_t < t_end
        wk, wk1, wv, wv1, vsc, vzp = _gload(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, offs_t, t_end,
                                            NK, NK1, NV, NV1, VEC, VEC1)
        if PREF > 1:  # a second tile in flight
            wk2, wk12, wv2, wv12, vsc2, vzp2 = _gload(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, offs_t + BT, t_end,
                                                      NK, NK1, NV, NV1, VEC, VEC1)
        # loop-carried tiles start as zeros in the layout of the field tiles (no layout conversions)
        zq = tl.sum(_fields_joined(wk.to(tl.uint32, bitcast=True), 0, 1, CK, KW, LOWP, MODE) * 0.0, axis=0)
        za = _fields_tile(wv, VW, LOWPV, BT, NV, MODE, True) * 0.0
        z_t = _kscore(wk, zq, KW, LOWP, MODE)
        zs = tl.sum(z_t, axis=0)
        ck = _chan(NK, CK)
        fk = _fac(KW, LOWP, NK, MODE)
        qs0 = tl.load(q_ptr + row0 * D + ck).to(tl.float32) * qscale
        qf0, b0, m0, l0, ps0, pz0, a0 = zq, zs, zs - float("inf"), z_t, z_t, z_t, za
        a1 = za
        if KW1 > 0:
            CK1: tl.constexpr = 32 // KW1
            zq1 = tl.sum(_fields_joined(wk1.to(tl.uint32, bitcast=True), 0, 1, CK1, KW1, LOWP, MODE) * 0.0, axis=0)
            qf01 = zq1
            ck1 = _chan(NK1, CK1)
            fk1 = _fac(KW1, LOWP, NK1, MODE) * (1 << KW)
            qs01 = tl.load(q_ptr + row0 * D + ck1).to(tl.float32) * qscale
        if TWO:
            a1 = _fields_tile(wv1, VW1, LOWPV, BT, NV1, MODE, True) * 0.0
        if GB > 1:
            qs1 = tl.load(q_ptr + (row0 + 1) * D + ck).to(tl.float32) * qscale
            qf1, b1, m1, l1, ps1, pz1, a_1 = zq, zs, zs - float("inf"), z_t, z_t, z_t, za
        if GB > 2:
            qs2 = tl.load(q_ptr + (row0 + 2) * D + ck).to(tl.float32) * qscale
            qf2, b2, m2, l2, ps2, pz2, a_2 = zq, zs, zs - float("inf"), z_t, z_t, z_t, za
        if GB > 3:
            qs3 = tl.load(q_ptr + (row0 + 3) * D + ck).to(tl.float32) * qscale
            qf3, b3, m3, l3, ps3, pz3, a_3 = zq, zs, zs - float("inf"), z_t, z_t, z_t, za
        for t0 in range(t_begin, t_end, BT):
            offs_t = t0 + tl.arange(0, BT)
            tm = offs_t < t_end
            if PREF > 1:  # issue the loads of the tile after next first; this tile's were issued 2 steps ago
                wk_c, wk1_c, wv_c, wv1_c, vsc_c, vzp_c = wk, wk1, wv, wv1, vsc, vzp
                wk, wk1, wv, wv1, vsc, vzp = wk2, wk12, wv2, wv12, vsc2, vzp2
                wk2, wk12, wv2, wv12, vsc2, vzp2 = _gload(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, offs_t + 2 * BT,
                                                          t_end, NK, NK1, NV, NV1, VEC, VEC1)
            elif PREF == 1:  # issue the next tile's loads first; this tile's words were loaded one step ago
                wk_c, wk1_c, wv_c, wv1_c, vsc_c, vzp_c = wk, wk1, wv, wv1, vsc, vzp
                wk, wk1, wv, wv1, vsc, vzp = _gload(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, offs_t + BT, t_end,
                                                    NK, NK1, NV, NV1, VEC, VEC1)
            else:
                wk_c, wk1_c, wv_c, wv1_c, vsc_c, vzp_c = _gload(kw_ptr, vw_ptr, vs_ptr, vz_ptr, n, T_CAP, offs_t,
                                                                t_end, NK, NK1, NV, NV1, VEC, VEC1)
            if t0 % KB == 0:  # new key block: fold its scales into the queries, its zeros into biases
                kb = (n * NB_CAP + t0 // KB) * D
                ksb = tl.load(ks_ptr + kb + ck).to(tl.float32) * fk
                kzb = tl.load(kz_ptr + kb + ck).to(tl.float32)
                qf0, b0 = _gfold(qs0, ksb, kzb, NK, CK, MODE)
                if KW1 > 0:
                    qf01, bb = _gfold(qs01, tl.load(ks_ptr + kb + ck1).to(tl.float32) * fk1, 0.0, NK1, CK1, MODE)
                    b0 += bb
                if GB > 1:
                    qf1, b1 = _gfold(qs1, ksb, kzb, NK, CK, MODE)
                if GB > 2:
                    qf2, b2 = _gfold(qs2, ksb, kzb, NK, CK, MODE)
                if GB > 3:
                    qf3, b3 = _gfold(qs3, ksb, kzb, NK, CK, MODE)
            fv = _fields_tile(wv_c, VW, LOWPV, BT, NV, MODE, True)
            if TWO:
                fv1 = _fields_tile(wv1_c, VW1, LOWPV, BT, NV1, MODE, True)
            else:
                fv1 = fv
            s = _kscore(wk_c, qf0, KW, LOWP, MODE)
            if KW1 > 0:
                s += _kscore(wk1_c, qf01, KW1, LOWP, MODE)
            m0, l0, ps0, pz0, a0, a1 = _gstep(s, tm, b0, m0, l0, ps0, pz0, a0, vsc_c, vzp_c, fv, a1, fv1, TWO)
            if GB > 1:
                s = _kscore(wk_c, qf1, KW, LOWP, MODE)
                m1, l1, ps1, pz1, a_1, _u = _gstep(s, tm, b1, m1, l1, ps1, pz1, a_1, vsc_c, vzp_c, fv, a_1, fv, False)
            if GB > 2:
                s = _kscore(wk_c, qf2, KW, LOWP, MODE)
                m2, l2, ps2, pz2, a_2, _u = _gstep(s, tm, b2, m2, l2, ps2, pz2, a_2, vsc_c, vzp_c, fv, a_2, fv, False)
            if GB > 3:
                s = _kscore(wk_c, qf3, KW, LOWP, MODE)
                m3, l3, ps3, pz3, a_3, _u = _gstep(s, tm, b3, m3, l3, ps3, pz3, a_3, vsc_c, vzp_c, fv, a_3, fv, False)
        fac = _fac(VW, LOWPV, NV, MODE)
        if TWO:
            fac1 = _fac(VW1, LOWPV, NV1, MODE) * (1 << VW)
        else:
            fac1 = fac
        _gfinal(m0, l0, ps0, pz0, a0, fac, a1, fac1, o_ptr + (row0 * S1 + sp) * D, lse_ptr + row0 * S1 + sp, D,
                MODE, TWO)
        if GB > 1:
            _gfinal(m1, l1, ps1, pz1, a_1, fac, a_1, fac, o_ptr + ((row0 + 1) * S1 + sp) * D,
                    lse_ptr + (row0 + 1) * S1 + sp, D, MODE, False)
        if GB > 2:
            _gfinal(m2, l2, ps2, pz2, a_2, fac, a_2, fac, o_ptr + ((row0 + 2) * S1 + sp) * D,
                    lse_ptr + (row0 + 2) * S1 + sp, D, MODE, False)
        if GB > 3:
            _gfinal(m3, l3, ps3, pz3, a_3, fac, a_3, fac, o_ptr + ((row0 + 3) * S1 + sp) * D,
                    lse_ptr + (row0 + 3) * S1 + sp, D, MODE, False)
    else:
        for g in tl.static_range(GB):
            row = row0 + g
            q = tl.load(q_ptr + row * D + offs_d).to(tl.float32) * qscale  # (D,)
            l_i = tl.sum(q * 0.0, axis=0)
            m_i = l_i - float("inf")
            acc = q * 0.0
            for part in tl.static_range(2):
                if part == 0:
                    base_k = sk_ptr + n * S_CAP * D
                    base_v = sv_ptr + n * S_CAP * D
                    n_tok = n_sink
                else:
                    base_k = rk_ptr + n * R_CAP * D
                    base_v = rv_ptr + n * R_CAP * D
                    n_tok = n_recent
                for t0 in range(0, n_tok, BTF):
                    offs_t = t0 + tl.arange(0, BTF)
                    tm = offs_t < n_tok
                    ptr = offs_t[:, None] * D + offs_d[None, :]
                    k = tl.load(base_k + ptr, mask=tm[:, None], other=0.0).to(tl.float32)
                    v = tl.load(base_v + ptr, mask=tm[:, None], other=0.0).to(tl.float32)
                    qd = tl.load(q_ptr + row * D + offs_d).to(tl.float32) * qscale  # see _decode_fma_kernel
                    s = tl.sum(qd[None, :] * k, axis=1)
                    s = tl.where(tm, s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=0))
                    alpha = tl.exp2(m_i - m_new)
                    pf = tl.exp2(s - m_new)
                    l_i = l_i * alpha + tl.sum(pf, axis=0)
                    acc = acc * alpha + tl.sum(pf[:, None] * v, axis=0)
                    m_i = m_new
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            tl.store(o_ptr + (row * S1 + sp) * D + offs_d, acc / l_safe)
            tl.store(lse_ptr + row * S1 + sp, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")))


# ----------------------------------------------------------------------------------------------
# Decode attention, tensor-core path for uniform codes with per-token values (value_group == D):
# transposed products S^T = K Q^T and O^T = V^T P^T so that the dequantized tiles are the big
# (M >= 64) operand; dequantization is the mantissa trick (``f - 1 = code * 2**-w``, exact in fp16)
# with the key scales folded into Q and the value scales into P; zero points go into bias terms.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fields_rows(words, anchor_ptr, WIDTH: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """``(BT, NW)`` words -> ``(BT, D)`` fp16 ``code * 2**-WIDTH`` (exact) (channel ``i * CPW + j``)."""
    CPW: tl.constexpr = 32 // WIDTH
    MASK: tl.constexpr = ((1 << WIDTH) - 1) << (23 - WIDTH)
    j = tl.arange(0, CPW)
    sl = tl.maximum(23 - WIDTH - j * WIDTH, 0).to(tl.uint32)[None, None, :]  # field j -> bits 23-WIDTH..22
    sr = tl.maximum(j * WIDTH + WIDTH - 23, 0).to(tl.uint32)[None, None, :]
    NW: tl.constexpr = D // CPW
    # layout anchor: a never-taken load, contiguous along the fields, so that each thread holds
    # whole words' fields (vectorized shared-memory stores of the dequantized tile)
    o3 = (tl.arange(0, BT)[:, None, None] * NW + tl.arange(0, NW)[None, :, None]) * CPW + tl.arange(0, CPW)[None, None, :]
    never = (tl.arange(0, BT) < 0)[:, None, None]
    anchor = tl.load(anchor_ptr + o3, mask=never, other=0)
    w = words.to(tl.uint32, bitcast=True)[:, :, None] + anchor.to(tl.uint32)
    rot = (w << sl) >> sr
    f = ((rot & MASK) | 0x3F800000).to(tl.float32, bitcast=True) - 1.0  # code * 2**-WIDTH, exact
    return tl.reshape(f, (BT, D)).to(tl.float16)


@triton.jit
def _fields_cols(words, WIDTH: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """``(NW, BT)`` words -> ``(D, BT)`` fp16 ``code * 2**-WIDTH`` (exact)."""
    CPW: tl.constexpr = 32 // WIDTH
    MASK: tl.constexpr = ((1 << WIDTH) - 1) << (23 - WIDTH)
    j = tl.arange(0, CPW)
    sl = tl.maximum(23 - WIDTH - j * WIDTH, 0).to(tl.uint32)[None, :, None]
    sr = tl.maximum(j * WIDTH + WIDTH - 23, 0).to(tl.uint32)[None, :, None]
    w = words.to(tl.uint32, bitcast=True)[:, None, :]
    rot = (w << sl) >> sr
    f = ((rot & MASK) | 0x3F800000).to(tl.float32, bitcast=True) - 1.0
    return tl.reshape(f, (D, BT)).to(tl.float16)


@triton.jit
def _decode_mma_kernel(
    q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr,
    sm_scale, T_CAP, NB_CAP, S_CAP, R_CAP, n_packed, n_sink, n_recent, tiles_per_split, n_splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, KW0: tl.constexpr, KW1: tl.constexpr,
    VW0: tl.constexpr, VW1: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, BTF: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # b * H + h
    sp = tl.program_id(1)
    S1 = n_splits + 1
    WK: tl.constexpr = (KW0 + KW1) * D // 32
    WV: tl.constexpr = (VW0 + VW1) * D // 32
    offs_g = tl.arange(0, GP)
    g_mask = offs_g < G
    offs_d = tl.arange(0, D)
    rows = n * G + offs_g
    qT = tl.load(q_ptr + rows[None, :] * D + offs_d[:, None], mask=g_mask[None, :], other=0.0).to(tl.float32)
    qT = qT * (sm_scale * _LOG2E)  # (D, GP)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    accT = tl.zeros((D, GP), tl.float32)
    corr = tl.zeros((GP,), tl.float32)
    if sp < n_splits:
        t_begin = sp * tiles_per_split * BT
        t_end = tl.minimum(t_begin + tiles_per_split * BT, n_packed)
        for t0 in range(t_begin, t_end, BT):
            offs_t = t0 + tl.arange(0, BT)
            tm = offs_t < t_end  # the last tile may be partial (n_packed need not be a multiple of BT)
            kb = (n * NB_CAP + t0 // KB) * D
            ksc = tl.load(ks_ptr + kb + offs_d).to(tl.float32)[:, None]  # (D, 1)
            kzp = tl.load(kz_ptr + kb + offs_d).to(tl.float32)[:, None]
            wq0 = qT * ksc * (1 << KW0)
            bias = tl.sum(qT * kzp, axis=0)  # (GP,)
            krow = kw_ptr + (n * T_CAP + offs_t) * WK
            NWK0: tl.constexpr = D * KW0 // 32
            kf = _fields_rows(tl.load(krow[:, None] + tl.arange(0, NWK0)[None, :], mask=tm[:, None], other=0),
                              kw_ptr, KW0, D, BT)
            sT = tl.dot(kf, wq0.to(tl.float16))  # (BT, GP)
            if KW1 > 0:
                NWK1: tl.constexpr = D * KW1 // 32
                wq1 = qT * ksc * (1 << (KW0 + KW1))
                kf1 = _fields_rows(tl.load(krow[:, None] + NWK0 + tl.arange(0, NWK1)[None, :], mask=tm[:, None],
                                           other=0), kw_ptr, KW1, D, BT)
                sT += tl.dot(kf1, wq1.to(tl.float16))
            sT = tl.where(tm[:, None], sT + bias[None, :], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sT, axis=0))
            alpha = tl.exp2(m_i - m_new)
            pT = tl.exp2(sT - m_new[None, :])  # (BT, GP)
            l_i = l_i * alpha + tl.sum(pT, axis=0)
            vsc = tl.load(vs_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)  # (BT,), one group/token
            vzp = tl.load(vz_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)
            corr = corr * alpha + tl.sum(pT * vzp[:, None], axis=0)
            vcol = vw_ptr + (n * T_CAP + offs_t) * WV  # (BT,)
            NWV0: tl.constexpr = D * VW0 // 32
            vf = _fields_cols(tl.load(vcol[None, :] + tl.arange(0, NWV0)[:, None], mask=tm[None, :], other=0),
                              VW0, D, BT)  # (D, BT)
            accT = accT * alpha[None, :] + tl.dot(vf, (pT * (vsc * (1 << VW0))[:, None]).to(tl.float16))
            if VW1 > 0:
                NWV1: tl.constexpr = D * VW1 // 32
                vf1 = _fields_cols(tl.load(vcol[None, :] + NWV0 + tl.arange(0, NWV1)[:, None], mask=tm[None, :],
                                           other=0), VW1, D, BT)
                accT += tl.dot(vf1, (pT * (vsc * (1 << (VW0 + VW1)))[:, None]).to(tl.float16))
            m_i = m_new
        accT = accT + corr[None, :]
    else:
        for part in tl.static_range(2):
            if part == 0:
                base_k = sk_ptr + n * S_CAP * D
                base_v = sv_ptr + n * S_CAP * D
                n_tok = n_sink
            else:
                base_k = rk_ptr + n * R_CAP * D
                base_v = rv_ptr + n * R_CAP * D
                n_tok = n_recent
            for t0 in range(0, n_tok, BTF):
                offs_t = t0 + tl.arange(0, BTF)
                tm = offs_t < n_tok
                k = tl.load(base_k + offs_t[:, None] * D + offs_d[None, :], mask=tm[:, None], other=0.0)
                vT = tl.load(base_v + offs_t[None, :] * D + offs_d[:, None], mask=tm[None, :], other=0.0)
                sT = tl.dot(k.to(tl.float16), qT.to(tl.float16))  # (BTF, GP)
                sT = tl.where(tm[:, None], sT, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sT, axis=0))
                alpha = tl.exp2(m_i - m_new)
                pT = tl.exp2(sT - m_new[None, :])
                l_i = l_i * alpha + tl.sum(pT, axis=0)
                accT = accT * alpha[None, :] + tl.dot(vT.to(tl.float16), pT.to(tl.float16))
                m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    outT = accT / l_safe[None, :]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(o_ptr + (rows[None, :] * S1 + sp) * D + offs_d[:, None], outT, mask=g_mask[None, :])
    tl.store(lse_ptr + rows * S1 + sp, lse, mask=g_mask)


# ----------------------------------------------------------------------------------------------
# "gmma" (round 5, GQA): one program per KV head and split; the G query heads (padded to GP = 16 columns,
# q rows beyond G zero) share every word tile through tl.dot. Fields come out as fp16 exact codes by the
# fp16x2 magic number (``_codes16``: one shift + one LOP3 + one sub.f16x2 per two fields, no cvt), the key
# scales are folded into q (fp16), the value scales into p; zero points into bias terms. The next tile's
# words (and value scales) are loaded at the top of the loop body (register prefetch, ``PREF``).
# ``VT`` 1: values as the transposed product accT (D, GP) += V^T (D, BT) P (BT, GP); 0: acc (GP, D) +=
# P^T (GP, BT) V (BT, D). One bit slice only (2/4/8-bit codes).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _codes16(words, J: tl.constexpr, WIDTH: tl.constexpr, ASM: tl.constexpr):
    """fp16 exact codes of fields ``J`` and ``J + 16 // WIDTH`` of uint32 ``words`` (``(lo, hi)``)."""
    SH: tl.constexpr = J * WIDTH
    M: tl.constexpr = ((1 << WIDTH) - 1) * 0x00010001
    if SH > 0:
        x = words >> SH
    else:
        x = words
    if ASM == 1:
        t = (x & M) | 0x64006400
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 c, t; mov.b32 c, 0x64006400; sub.f16x2 t, $2, c; mov.b32 {$0, $1}, t; }",
            "=h,=h,r", [t], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        return lo, hi
    elif ASM == 2:
        t = (x & M) | 0x64006400
        u = tl.inline_asm_elementwise(
            "{ .reg .b32 c; mov.b32 c, 0x64006400; sub.f16x2 $0, $1, c; }",
            "=r,r", [t], dtype=tl.uint32, is_pure=True, pack=1)
        lo = (u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        hi = (u >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
        return lo, hi
    else:
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
def _decode_gmma_kernel(
    q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, o_ptr, lse_ptr,
    sm_scale, T_CAP, NB_CAP, S_CAP, R_CAP, n_packed, n_sink, n_recent, tiles_per_split, n_splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, KW: tl.constexpr, VW: tl.constexpr, KB: tl.constexpr,
    BT: tl.constexpr, BTF: tl.constexpr, PREF: tl.constexpr, ASM: tl.constexpr, VT: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # b * H + h
    sp = tl.program_id(1)
    S1 = n_splits + 1
    NWK: tl.constexpr = D * KW // 32
    NWV: tl.constexpr = D * VW // 32
    offs_g = tl.arange(0, GP)
    g_mask = offs_g < G
    offs_d = tl.arange(0, D)
    rows = n * G + offs_g
    qT = tl.load(q_ptr + rows[None, :] * D + offs_d[:, None], mask=g_mask[None, :], other=0.0).to(tl.float32)
    qT = qT * (sm_scale * _LOG2E)  # (D, GP)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    corr = tl.zeros((GP,), tl.float32)
    if VT:
        acc = tl.zeros((D, GP), tl.float32)
    else:
        acc = tl.zeros((GP, D), tl.float32)
    if sp < n_splits:
        t_begin = sp * tiles_per_split * BT
        t_end = tl.minimum(t_begin + tiles_per_split * BT, n_packed)
        ar = tl.arange(0, BT)
        if PREF:
            offs_n = t_begin + ar
            tmn = offs_n < t_end
            kwn = tl.load(kw_ptr + (n * T_CAP + offs_n)[:, None] * NWK + tl.arange(0, NWK)[None, :],
                          mask=tmn[:, None], other=0)
            vwn = tl.load(vw_ptr + (n * T_CAP + offs_n)[:, None] * NWV + tl.arange(0, NWV)[None, :],
                          mask=tmn[:, None], other=0)
            vsn = tl.load(vs_ptr + n * T_CAP + offs_n, mask=tmn, other=0.0)
            vzn = tl.load(vz_ptr + n * T_CAP + offs_n, mask=tmn, other=0.0)
        for t0 in range(t_begin, t_end, BT):
            offs_t = t0 + ar
            tm = offs_t < t_end  # the last tile may be partial (n_packed need not be a multiple of BT)
            if PREF:
                kwc = kwn
                vwc = vwn
                vsc = vsn.to(tl.float32)
                vzp = vzn.to(tl.float32)
                offs_n = offs_t + BT
                tmn = offs_n < t_end
                kwn = tl.load(kw_ptr + (n * T_CAP + offs_n)[:, None] * NWK + tl.arange(0, NWK)[None, :],
                              mask=tmn[:, None], other=0)
                vwn = tl.load(vw_ptr + (n * T_CAP + offs_n)[:, None] * NWV + tl.arange(0, NWV)[None, :],
                              mask=tmn[:, None], other=0)
                vsn = tl.load(vs_ptr + n * T_CAP + offs_n, mask=tmn, other=0.0)
                vzn = tl.load(vz_ptr + n * T_CAP + offs_n, mask=tmn, other=0.0)
            else:
                kwc = tl.load(kw_ptr + (n * T_CAP + offs_t)[:, None] * NWK + tl.arange(0, NWK)[None, :],
                              mask=tm[:, None], other=0)
                vwc = tl.load(vw_ptr + (n * T_CAP + offs_t)[:, None] * NWV + tl.arange(0, NWV)[None, :],
                              mask=tm[:, None], other=0)
                vsc = tl.load(vs_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)
                vzp = tl.load(vz_ptr + n * T_CAP + offs_t, mask=tm, other=0.0).to(tl.float32)
            kb = (n * NB_CAP + t0 // KB) * D
            ksc = tl.load(ks_ptr + kb + offs_d).to(tl.float32)[:, None]  # (D, 1)
            kzp = tl.load(kz_ptr + kb + offs_d).to(tl.float32)[:, None]
            wq = (qT * ksc).to(tl.float16)
            bias = tl.sum(qT * kzp, axis=0)  # (GP,)
            kf = _codes16_tile(kwc, KW, BT, NWK, ASM)  # (BT, D) fp16 exact codes
            sT = tl.dot(kf, wq)  # (BT, GP)
            sT = tl.where(tm[:, None], sT + bias[None, :], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sT, axis=0))
            alpha = tl.exp2(m_i - m_new)
            pT = tl.exp2(sT - m_new[None, :])  # (BT, GP)
            l_i = l_i * alpha + tl.sum(pT, axis=0)
            corr = corr * alpha + tl.sum(pT * vzp[:, None], axis=0)
            pv = (pT * vsc[:, None]).to(tl.float16)
            vf = _codes16_tile(vwc, VW, BT, NWV, ASM)  # (BT, D)
            if VT:
                acc = acc * alpha[None, :] + tl.dot(tl.trans(vf), pv)
            else:
                acc = acc * alpha[:, None] + tl.dot(tl.trans(pv), vf)
            m_i = m_new
        if VT:
            acc = acc + corr[None, :]
        else:
            acc = acc + corr[:, None]
    else:
        for part in tl.static_range(2):
            if part == 0:
                base_k = sk_ptr + n * S_CAP * D
                base_v = sv_ptr + n * S_CAP * D
                n_tok = n_sink
            else:
                base_k = rk_ptr + n * R_CAP * D
                base_v = rv_ptr + n * R_CAP * D
                n_tok = n_recent
            for t0 in range(0, n_tok, BTF):
                offs_t = t0 + tl.arange(0, BTF)
                tm = offs_t < n_tok
                k = tl.load(base_k + offs_t[:, None] * D + offs_d[None, :], mask=tm[:, None], other=0.0)
                v = tl.load(base_v + offs_t[:, None] * D + offs_d[None, :], mask=tm[:, None], other=0.0)
                sT = tl.dot(k.to(tl.float16), qT.to(tl.float16))  # (BTF, GP)
                sT = tl.where(tm[:, None], sT, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sT, axis=0))
                alpha = tl.exp2(m_i - m_new)
                pT = tl.exp2(sT - m_new[None, :])
                l_i = l_i * alpha + tl.sum(pT, axis=0)
                if VT:
                    acc = acc * alpha[None, :] + tl.dot(tl.trans(v.to(tl.float16)), pT.to(tl.float16))
                else:
                    acc = acc * alpha[:, None] + tl.dot(tl.trans(pT.to(tl.float16)), v.to(tl.float16))
                m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    if VT:
        out = acc / l_safe[None, :]
        tl.store(o_ptr + (rows[None, :] * S1 + sp) * D + offs_d[:, None], out, mask=g_mask[None, :])
    else:
        out = acc / l_safe[:, None]
        tl.store(o_ptr + (rows[:, None] * S1 + sp) * D + offs_d[None, :], out, mask=g_mask[:, None])
    tl.store(lse_ptr + rows * S1 + sp, lse, mask=g_mask)


@triton.jit
def _reduce_kernel(o_ptr, lse_ptr, out_ptr, S1, SP: tl.constexpr, D: tl.constexpr, NSLOT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SP)
    sm = offs_s < S1
    lse = tl.load(lse_ptr + row * S1 + offs_s, mask=sm, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    w = tl.where(sm & (lse > float("-inf")), tl.exp2(lse - mx), 0.0)
    o = tl.zeros((SP, D), tl.float32)
    for k in tl.static_range(NSLOT):
        o += tl.load(o_ptr + ((row * S1 + offs_s)[:, None] * NSLOT + k) * D + tl.arange(0, D)[None, :],
                     mask=sm[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * D + tl.arange(0, D), out.to(out_ptr.dtype.element_ty))


_SM_COUNT: dict = {}
_LAST_FMAG = None  # last compiled fmag kernel (registers / spills for the probes)


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _fma_slices(bits: int, head_dim: int):
    """(w0, w1) slice widths of a code (at most two slices), or None where the fast paths do not apply."""
    sl = bit_slices(bits, head_dim)
    if len(sl) > 2:
        return None
    return sl[0][0], (sl[1][0] if len(sl) == 2 else 0)


def fma_path_applies(kv, n_rep: int) -> bool:
    """True where the CUDA-core path is chosen: uniform codes, post-RoPE keys, no outliers, per-token values,
    no GQA (the kernel also runs for ``n_rep > 1``, one program per query head, but re-reads the words
    ``n_rep`` times and measured 0.3-0.7x of fp16 on an H100 there; "mma"/"dot" are faster)."""
    d = kv.k_scale.shape[-1]
    return (
        kv.k_lut is None and kv.v_lut is None and kv.inv_freq is None and kv.ol_ptr is None
        and kv.v_scale.shape[-1] == 1 and n_rep == 1
        and _fma_slices(kv.key_bits, d) is not None and _fma_slices(kv.value_bits, d) is not None
    )


def mma_path_applies(kv, n_rep: int) -> bool:
    """True where the transposed tensor-core path applies (uniform, post-RoPE, no outliers, per-token V)."""
    return (
        kv.k_lut is None and kv.v_lut is None and kv.inv_freq is None and kv.ol_ptr is None
        and kv.v_scale.shape[-1] == 1 and n_rep <= 16 and kv.key_bits == 4 and kv.value_bits == 4
    )  # 2/3-bit codes gave NaN on an H100 (Triton 3.6) though they pass the interpreter: not enabled


def _fma_defaults(kv, G: int) -> dict:
    """Launch parameters of the CUDA-core path (measured on an H100, see reports/bench/README.md)."""
    # H100, Llama-2-7B shape, B=8, T=64k (reports/bench/probe_fma.py): tile 16 x 1 warp 1.54 ms, tile 32 x 1
    # warp 2.04 ms, tile 32 x 4 warps 1.94 ms; 16 waves of programs 1.51 ms vs 8 waves 1.54 ms, 4 waves 2.17 ms;
    # lowp 11 vs 15 -1 to -2 %; num_stages and vec 2 vs 4 within 2 %.
    # lowp_v 19 (values): accumulating 1 + code * 2**(POS-23) over ~10^3 tokens per thread in fp32 and
    # subtracting the 1s at the end loses 2**(23-POS) times more relative precision; POS >= 19 keeps the
    # error at ~1e-3 up to 128k tokens (lowp_v 11 gave 8e-3 relative error at 3 bits, 16k tokens).
    return dict(tile=16, num_warps=1, num_stages=3, vec=4, lowp=11, lowp_v=19, waves=16)


def fmag_path_applies(kv, n_rep: int) -> bool:
    """True where the grouped CUDA-core path runs: as "fma" (any ``n_rep``); codes of two bit slices
    (3 bits: 2 + 1) only with one query head per program (``gb`` 1)."""
    d = kv.k_scale.shape[-1]
    return (
        kv.k_lut is None and kv.v_lut is None and kv.inv_freq is None and kv.ol_ptr is None
        and kv.v_scale.shape[-1] == 1
        and _fma_slices(kv.key_bits, d) is not None and _fma_slices(kv.value_bits, d) is not None
    )


# Field extraction of the "fmag" path (see ``_field``): 0 shift + LOP3 per field; 1 byte fields + PRMT
# emulated in Triton; 2 byte fields + PRMT as inline PTX (GPU only; the interpreter runs 1 instead).
# 3 fp16x2 magic-number pairs (``_pair``: one shift + one LOP3 per two fields, cvt.f32.f16 on the FP pipe;
# value fields exact codes via sub.f16x2); 4 the same with exact key codes; 5 / 6: 3 / 4 in plain Triton.
# Default (None): 2 where every slice is at most 2 bits wide (2-bit, 3-bit = 2 + 1), 3 where the widest slice
# is 4 bits, else 0. Round 4 (reports/bench/probe_round4.log, H100, T = 64k, MHA): 4-bit mode 0 2.28x / 2.28x
# fp16 (b1 / b8), mode 3 2.54x / 2.47x, mode 4 2.48x / 2.44x; 2-bit mode 2 2.98x / 3.02x, mode 3 1.01x (one
# outlier run) / 2.84x, mode 4 2.82x / 2.81x; 3-bit mode 2 1.74x / 1.61x, mode 3 1.68x / 1.52x. Round 3: H100, T = 64k
# (reports/bench/probe_round3.log): 2-bit MHA 2.70x -> 3.00x fp16 (b1), 2.67x -> 3.02x (b8); 3-bit (fmag,
# tile 8) 1.51x / 1.39x with 0, 1.75x / 1.61x with 2; 4-bit 2.29x / 2.28x with 0, 2.23x / 2.19x with 2.
_MODE_ENV = os.environ.get("KVBENCH_FMAG_MODE")
FMAG_MODE = None if _MODE_ENV in (None, "") else int(_MODE_ENV)


def _fmag_mode(kv) -> int:
    if FMAG_MODE is not None:
        return FMAG_MODE
    d = kv.k_scale.shape[-1]
    w = max(_fma_slices(kv.key_bits, d) + _fma_slices(kv.value_bits, d))
    return 2 if w <= 2 else (3 if w == 4 else 0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _split_plan(q, n_units: int, n_prog: int, waves: int, n_splits):
    """Flash-decoding split of ``n_units`` (tiles or key blocks) over the sequence.

    Returns ``(units_per_split, n_splits, o_part, lse)``: by default about ``waves`` programs per SM over
    the ``n_prog`` programs of one split; the partial outputs ``(B*Hq, n_splits + 1, 1, D)`` fp32 and their
    log-sum-exps ``(B*Hq, n_splits + 1)`` have one more slot for the fp16 sink/recent part.
    """
    if n_splits is None:
        n_splits = max(1, min(n_units, triton.cdiv(waves * _num_sms(q.device), n_prog)))
    per = max(1, triton.cdiv(n_units, max(n_splits, 1)))
    n_splits = triton.cdiv(n_units, per) if n_units else 0
    B, Hq, D = q.shape
    o_part = torch.empty(B * Hq, n_splits + 1, 1, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B * Hq, n_splits + 1, dtype=torch.float32, device=q.device)
    return per, n_splits, o_part, lse


def _fmag_defaults(kv, G: int) -> dict:
    """Launch parameters of the grouped CUDA-core path (see reports/bench/README.md).

    H100, T=64k (reports/bench/probe_fmag_round2{a,b}.log), MHA Llama-2-7B shape: tile 16 x 1 warp with one
    tile prefetched 2.26-2.29x fp16 at 4 bits, 2.65-2.68x at 2 bits (no prefetch 1.65-1.84x, two tiles in
    flight 2.18-2.21x, tile 32 x 2 warps 2.10-2.35x, tile 8 x 1 warp 1.9-2.2x). GQA (G=4): every grouped
    variant measured 0.40-0.99x (gb 4 with 32 channels per thread spills; 16 channels per thread is
    slower), not faster than "mma"/"dot", so the automatic choice uses "fmag" for G == 1 only.
    Two bit slices (3 bits): tile 8, 2 words of the 2-bit slice and 1 of the 1-bit slice per thread
    (32 channels of each), one head per program."""
    d = kv.k_scale.shape[-1]
    mode = _fmag_mode(kv)
    two = _fma_slices(kv.key_bits, d)[1] > 0 or _fma_slices(kv.value_bits, d)[1] > 0
    if two:
        return dict(tile=8, num_warps=1, vec=2, gb=1, pref=1, lowp=11, lowp_v=19, waves=16, mode=mode)
    # G > 1: one program per query head (gb 1) measured best with byte fields (2-bit: 0.96x / 0.80x fp16 at
    # b1 / b8 vs 0.41x / 0.57x with gb 4, which spills); gb 4 stays the default only for mode 0
    gb = 1 if mode else (4 if G % 4 == 0 else (2 if G % 2 == 0 else 1))
    vec = 4 if kv.value_bits >= 4 else 2
    if gb == 1:
        return dict(tile=16, num_warps=1, vec=4, gb=1, pref=1, lowp=11, lowp_v=19, waves=16, mode=mode)
    return dict(tile=16, num_warps=2, vec=vec, gb=gb, pref=1, lowp=11, lowp_v=19, waves=16, mode=mode)


def _decode_fmag(q, kv, scale, tile=None, num_warps=None, num_stages=None, n_splits=None, vec=None, lowp=None,
                 lowp_v=None, waves=None, gb=None, pref=None, mode=None, maxnreg=None):
    B, Hq, D = q.shape
    H = kv.k_words.shape[1]
    G = Hq // H
    cfg = _fmag_defaults(kv, G)
    bt = tile or cfg["tile"]
    gb = gb or cfg["gb"]
    if G % gb or gb > 4:
        raise ValueError(f"gb={gb} must divide the group size {G} and be at most 4")
    kw0, kw1 = _fma_slices(kv.key_bits, D)
    vw0, vw1 = _fma_slices(kv.value_bits, D)
    if (kw1 or vw1) and gb != 1:
        raise ValueError("codes of two bit slices need gb=1")
    mode = cfg["mode"] if mode is None else mode
    if max(kw0, kw1, vw0, vw1) > 4 and mode in (1, 2):
        mode = 0  # byte fields need WIDTH <= 4
    if mode in (2, 3, 4) and (_interpreting() or q.device.type != "cuda"):
        mode = {2: 1, 3: 5, 4: 6}[mode]  # the interpreter cannot run inline PTX: same arithmetic in plain Triton
    vec = vec or cfg["vec"]
    vec1 = max(1, vec * kw1 // kw0) if kw1 else vec
    kb = kv.key_block
    if kb % bt:
        raise ValueError(f"tile {bt} must divide key_block {kb}")
    n_prog = B * Hq // gb  # splits start on a key block
    bps, n_splits, o_part, lse = _split_plan(q, triton.cdiv(kv.n_packed, kb), n_prog, waves or cfg["waves"], n_splits)
    S1 = n_splits + 1
    global _LAST_FMAG
    _LAST_FMAG = _decode_fmag_kernel[(n_prog, S1)](
        q, kv.k_words, kv.k_scale, kv.k_zero, kv.v_words, kv.v_scale, kv.v_zero,
        kv.sink_k, kv.sink_v, kv.recent_k, kv.recent_v, o_part, lse,
        scale, kv.k_words.shape[2], kv.k_scale.shape[2], kv.sink_k.shape[2], kv.recent_k.shape[2],
        kv.n_packed, kv.n_sink, kv.n_recent, bps * (kb // bt), n_splits,
        G=G, GB=gb, D=D, KW=kw0, VW=vw0, KW1=kw1, VW1=vw1, KB=kb, BT=bt, BTF=16,
        VEC=vec, VEC1=vec1, LOWP=lowp or cfg["lowp"], LOWPV=lowp_v or cfg["lowp_v"],
        PREF=cfg["pref"] if pref is None else pref, MODE=mode,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or 1,
        **({} if maxnreg is None or _interpreting() else dict(maxnreg=maxnreg)),
    )
    return o_part, lse, S1


def gmma_path_applies(kv, n_rep: int) -> bool:
    """True where the GQA tensor-core path on fp16 magic-number codes runs ("gmma", round 5): uniform 2/4/8-bit
    codes (one bit slice), post-RoPE keys, no outliers, one value group per token, 2 <= ``n_rep`` <= 16."""
    d = kv.k_scale.shape[-1]
    return (
        kv.k_lut is None and kv.v_lut is None and kv.inv_freq is None and kv.ol_ptr is None
        and kv.v_scale.shape[-1] == 1 and 2 <= n_rep <= 16
        and kv.key_bits in (2, 4, 8) and kv.value_bits in (2, 4, 8) and d % 32 == 0
    )


def _decode_gmma(q, kv, scale, tile=None, num_warps=None, num_stages=None, n_splits=None, pref=1, asm=None,
                 vt=0, waves=4):
    # H100, Llama-3-8B shape (G = 4), T = 64k (reports/bench/probe_round5.log), x fp16 SDPA at b1 / b8:
    # vt 0, tile 64 x 4 warps: 4-bit 0.91x / 0.83x (mma 0.78x / 0.80x), 2-bit 0.98x / 1.02x (fmag gb 1
    # 0.95x / 0.81x); tile 32: 4-bit 0.82x / 0.82x, 2-bit 1.14x / 0.81x; tile 32 vt 0 0.76-0.77x; asm 0
    # (plain-Triton fields) 0.68-0.70x. vt 1 at tile >= 64 (wgmma with the register codes as A operand)
    # and pref 0 with num_stages 2 fault (illegal address, Triton 3.6): do not use them.
    B, Hq, D = q.shape
    H = kv.k_words.shape[1]
    G = Hq // H
    bt = tile or 64
    if kv.key_block % bt:
        raise ValueError(f"tile {bt} must divide key_block {kv.key_block}")
    if asm is None:
        asm = 1
    if _interpreting() or q.device.type != "cuda":
        asm = 0  # the interpreter cannot run inline PTX: same values in plain Triton
    tps, n_splits, o_part, lse = _split_plan(q, triton.cdiv(kv.n_packed, bt), B * H, waves, n_splits)
    S1 = n_splits + 1
    _decode_gmma_kernel[(B * H, S1)](
        q, kv.k_words, kv.k_scale, kv.k_zero, kv.v_words, kv.v_scale, kv.v_zero,
        kv.sink_k, kv.sink_v, kv.recent_k, kv.recent_v, o_part, lse,
        scale, kv.k_words.shape[2], kv.k_scale.shape[2], kv.sink_k.shape[2], kv.recent_k.shape[2],
        kv.n_packed, kv.n_sink, kv.n_recent, tps, n_splits,
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D, KW=kv.key_bits, VW=kv.value_bits, KB=kv.key_block,
        BT=bt, BTF=32, PREF=pref, ASM=asm, VT=vt, num_warps=num_warps or 4, num_stages=num_stages or 1,
    )
    return o_part, lse, S1


def _auto_path(kv, G: int) -> str:
    d = kv.k_scale.shape[-1]
    if G > 1 and gmma_path_applies(kv, G):
        # round 5 (H100, 64k, reports/bench/probe_round5.log): 4-bit 0.91x / 0.83x fp16 (b1 / b8; mma 0.78x /
        # 0.80x), 2-bit 0.98x / 1.02x (fmag gb 1 0.95x / 0.81x)
        return "gmma"
    if fmag_path_applies(kv, G):
        # MHA: always (H100, round 3: 2/3/4-bit 3.00x / 1.75x / 2.29x fp16 at b1, 64k, vs "fma" at 3 bits 1.17x).
        # GQA: only with 2-bit codes, one program per query head (0.96x / 0.80x vs "dot" 0.96x / 0.76x at
        # b1 / b8); 4-bit GQA stays on "mma" (0.56-0.80x vs 0.39-0.72x), 3-bit on "dot" (0.69x vs 0.53x).
        if G == 1 or (kv.key_bits == 2 and kv.value_bits == 2):
            return "fmag"
    return "mma" if mma_path_applies(kv, G) else "dot"


def _decode_fma(q, kv, scale, tile=None, num_warps=None, num_stages=None, n_splits=None, vec=None, lowp=None,
                lowp_v=None, waves=None):
    B, Hq, D = q.shape
    H = kv.k_words.shape[1]
    G = Hq // H
    cfg = _fma_defaults(kv, G)
    bt = tile or cfg["tile"]
    kb = kv.key_block
    if kb % bt:
        raise ValueError(f"tile {bt} must divide key_block {kb}")
    # splits start on a key block
    bps, n_splits, o_part, lse = _split_plan(q, triton.cdiv(kv.n_packed, kb), B * Hq, waves or cfg["waves"], n_splits)
    S1 = n_splits + 1
    kw0, kw1 = _fma_slices(kv.key_bits, D)
    vw0, vw1 = _fma_slices(kv.value_bits, D)
    _decode_fma_kernel[(B * Hq, S1)](
        q, kv.k_words, kv.k_scale, kv.k_zero, kv.v_words, kv.v_scale, kv.v_zero,
        kv.sink_k, kv.sink_v, kv.recent_k, kv.recent_v, o_part, lse,
        scale, kv.k_words.shape[2], kv.k_scale.shape[2], kv.sink_k.shape[2], kv.recent_k.shape[2],
        kv.n_packed, kv.n_sink, kv.n_recent, bps * (kb // bt), n_splits,
        G=G, D=D, KW0=kw0, KW1=kw1, VW0=vw0, VW1=vw1, KB=kb, BT=bt, BTF=16,
        VEC=vec or cfg["vec"], LOWP=lowp or cfg["lowp"], LOWPV=lowp_v or cfg["lowp_v"],
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return o_part, lse, S1


def decode_attention(q, kv, sm_scale=None, *, path=None, tile=None, num_warps=None, num_stages=None,
                     n_splits=None, **fma_tuning):
    """Triton twin of :func:`kvbench.kernels.reference.decode_attention` (split-K + reduction).

    Kernels, chosen by ``path`` (default ``$KVBENCH_KERNEL_PATH`` or automatic, ``_auto_path``; measurements
    in reports/bench/README.md):

    * ``"gmma"`` (automatic for GQA, ``n_rep > 1``, where :func:`gmma_path_applies`: uniform 2/4/8-bit codes,
      post-RoPE keys, no outliers, one value group per token): the query heads of a KV head share each word
      tile through ``tl.dot`` on fp16 magic-number codes;
    * ``"fmag"`` (automatic for MHA where :func:`fmag_path_applies`, and for 2-bit GQA where "gmma" does not
      apply): CUDA-core kernel on packed words, fields extracted with compile-time shifts or inline PTX;
    * ``"mma"`` (4-bit uniform, automatic only where neither of the above applies): tensor-core kernel on
      dequantized tiles;
    * ``"fma"`` (forced only): the first CUDA-core kernel, dominated by "fmag", kept as a baseline;
    * ``"dot"`` (everything else: NUQ codebooks, pre-RoPE keys, sparse outliers, grouped values).

    Tuning keywords: ``tile`` tokens per step (divides ``key_block``), ``num_warps``, ``num_stages``,
    ``n_splits`` (sequence splits), and the per-path keywords of ``_decode_fmag`` / ``_decode_gmma`` /
    ``_decode_fma`` (``vec``, ``lowp``, ``lowp_v``, ``waves``, ``gb``, ``pref``, ``mode``, ...).
    """
    B, Hq, D = q.shape
    H = kv.k_words.shape[1]
    G = Hq // H
    if path is None:
        path = os.environ.get("KVBENCH_KERNEL_PATH") or _auto_path(kv, G)
    q = q.contiguous()
    scale = D**-0.5 if sm_scale is None else sm_scale
    if path in ("fma", "fmag", "gmma"):
        run = {"fma": _decode_fma, "fmag": _decode_fmag, "gmma": _decode_gmma}[path]
        o_part, lse, S1 = run(q, kv, scale, tile, num_warps, num_stages, n_splits, **fma_tuning)
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
        _reduce_kernel[(B * Hq,)](o_part, lse, out, S1, SP=triton.next_power_of_2(S1), D=D, NSLOT=1)
        return out
    num_warps = num_warps or 4
    num_stages = num_stages or 2
    bt = tile or min(kv.key_block, 64)  # mma: tile 64 x 4 warps measured best on H100 (8 warps crashed)
    if kv.key_block % bt:
        raise ValueError(f"tile {bt} must divide key_block {kv.key_block}")
    tps, n_splits, o_part, lse = _split_plan(q, triton.cdiv(kv.n_packed, bt), B * H, 4, n_splits)
    S1 = n_splits + 1
    if path == "mma":
        kw0, kw1 = _fma_slices(kv.key_bits, D)
        vw0, vw1 = _fma_slices(kv.value_bits, D)
        _decode_mma_kernel[(B * H, S1)](
            q, kv.k_words, kv.k_scale, kv.k_zero, kv.v_words, kv.v_scale, kv.v_zero,
            kv.sink_k, kv.sink_v, kv.recent_k, kv.recent_v, o_part, lse,
            scale, kv.k_words.shape[2], kv.k_scale.shape[2], kv.sink_k.shape[2], kv.recent_k.shape[2],
            kv.n_packed, kv.n_sink, kv.n_recent, tps, n_splits,
            G=G, GP=max(16, triton.next_power_of_2(G)), D=D, KW0=kw0, KW1=kw1, VW0=vw0, VW1=vw1,
            KB=kv.key_block, BT=bt, BTF=32, num_warps=num_warps, num_stages=num_stages,
        )
    else:
        dmy = _dummy(q.device)
        has_ol = kv.ol_ptr is not None
        _decode_kernel[(B * H, S1)](
            q, kv.k_words, kv.k_scale, kv.k_zero, kv.v_words, kv.v_scale, kv.v_zero,
            dmy if kv.k_lut is None else kv.k_lut, dmy if kv.v_lut is None else kv.v_lut,
            kv.sink_k, kv.sink_v, kv.recent_k, kv.recent_v,
            kv.ol_ptr if has_ol else dmy, kv.ol_tok if has_ol else dmy,
            kv.ol_ch if has_ol else dmy, kv.ol_val if has_ol else dmy,
            dmy if kv.inv_freq is None else kv.inv_freq,
            o_part, lse,
            scale, H, kv.k_words.shape[2], kv.k_scale.shape[2], kv.sink_k.shape[2], kv.recent_k.shape[2],
            kv.ol_tok.shape[2] if has_ol else 0,
            kv.n_packed, kv.n_sink, kv.n_recent, tps, n_splits,
            G=G, GP=max(16, triton.next_power_of_2(G)), D=D, KBITS=kv.key_bits, VBITS=kv.value_bits,
            KB=kv.key_block, BT=bt, NG=kv.v_scale.shape[-1], K_LUT=kv.k_lut is not None,
            V_LUT=kv.v_lut is not None, PRE_ROPE=kv.inv_freq is not None, HAS_OL=has_ol, OL_CHUNK=32, BTF=32,
            num_warps=num_warps, num_stages=num_stages,
        )
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _reduce_kernel[(B * Hq,)](o_part, lse, out, S1, SP=triton.next_power_of_2(S1), D=D, NSLOT=1)
    return out


__all__ = ["pack_codes", "unpack_codes", "quantize_pack_keys", "quantize_pack_values", "decode_attention"]
