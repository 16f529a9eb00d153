"""Quantize and pack: Triton twins of :func:`kvbench.kernels.reference.quantize_pack_keys` / ``quantize_pack_values``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import SCALE_FLOOR, words_per_token
from .common import dummy, pack_tile

_FLOOR = tl.constexpr(SCALE_FLOOR)


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
    pack_tile(code, w_ptr + (n * T + offs_t) * W, offs_t < T, BITS, D, KB)


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
    pack_tile(code, w_ptr + (n * T + offs_t) * W, m, BITS, D, BT)


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
    dmy = dummy(x.device)
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
        x, words, s, z, dummy(x.device) if lut is None else lut.contiguous(), H, T,
        BITS=bits, D=D, W=w, G=group, BT=bt, HAS_LUT=lut is not None,
    )
    return words, s, z
