"""Pure-PyTorch reference twins of the Triton kernels in :mod:`kvbench.kernels.triton`.

Every function here has the same signature and returns the same tensors (bit-exact for packing and
quantization) as its Triton twin; the decode attention agrees within a stated relative tolerance.
See :mod:`kvbench.kernels` for the storage layout.
"""

from __future__ import annotations

import torch

from kvbench.model.anatomy import apply_rope, rope_tables

SCALE_FLOOR = 1e-5  # smallest stored scale (fp16 cannot hold quant.py's 1e-8)


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------
def bit_slices(bits: int, head_dim: int) -> list[tuple[int, int, int]]:
    """Split a code width into power-of-two slices.

    Returns:
        ``[(width, bit_offset, word_offset), ...]``: slice widths in descending order (8, 4, 2, 1),
        the bit of the code each slice starts at, and the first int32 word of the slice in a
        token's row of words. ``3 -> [(2, 0, 0), (1, 2, D/16)]``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    out, bit_off = [], 0
    for w in (8, 4, 2, 1):
        if bits & w:
            if head_dim % (32 // w):
                raise ValueError(f"head_dim {head_dim} must be a multiple of {32 // w} for {bits}-bit codes")
            out.append((w, bit_off, head_dim * bit_off // 32))
            bit_off += w
    return out


def words_per_token(bits: int, head_dim: int) -> int:
    """int32 words one token's ``head_dim`` codes take (``bits * head_dim / 32``, exact)."""
    bit_slices(bits, head_dim)
    return bits * head_dim // 32


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret non-negative int64 values < 2**32 as int32 bit patterns."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into int32 words.

    Args:
        codes: ``(..., D)`` integers in ``[0, 2**bits)``.
        bits: code width, 1..8.

    Returns:
        ``(..., bits * D // 32)`` int32 words (layout: :mod:`kvbench.kernels`).
    """
    d = codes.shape[-1]
    c = codes.to(torch.int64)
    parts = []
    for w, bit_off, _ in bit_slices(bits, d):
        cpw = 32 // w
        part = (c >> bit_off) & ((1 << w) - 1)  # (..., D)
        part = part.reshape(*c.shape[:-1], d // cpw, cpw)  # (..., NW, CPW)
        shifts = torch.arange(cpw, device=c.device) * w
        parts.append(_to_int32((part << shifts).sum(-1)))  # (..., NW)
    return torch.cat(parts, -1)


def unpack_codes(words: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        words: ``(..., bits * D // 32)`` int32.
        bits: code width.
        head_dim: ``D``.

    Returns:
        ``(..., D)`` int32 codes.
    """
    code = torch.zeros(*words.shape[:-1], head_dim, dtype=torch.int32, device=words.device)
    for w, bit_off, word_off in bit_slices(bits, head_dim):
        cpw = 32 // w
        nw = head_dim // cpw
        ws = words[..., word_off : word_off + nw].to(torch.int32)  # (..., NW)
        shifts = torch.arange(cpw, device=words.device, dtype=torch.int32) * w
        part = (ws[..., None] >> shifts) & ((1 << w) - 1)  # (..., NW, CPW); masking undoes the sign fill
        code += part.reshape(*words.shape[:-1], head_dim) << bit_off
    return code


# ----------------------------------------------------------------------------------------------
# Quantize and pack
# ----------------------------------------------------------------------------------------------
def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-rounded (scale, zero) of min/max stats, returned as fp32."""
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=SCALE_FLOOR)
    return scale.half().float(), lo.half().float()


def _codes(xn: torch.Tensor, bits: int, lut: torch.Tensor | None) -> torch.Tensor:
    """Codes of normalised values ``xn`` (code domain): rounding, or the nearest centroid.

    ``lut`` broadcasts against ``xn[..., None]`` (last axis: the ``2**bits`` centroids).
    """
    if lut is None:
        return torch.clamp(torch.floor(xn + 0.5), 0, 2**bits - 1).to(torch.int32)
    return torch.argmin(torch.abs(xn[..., None] - lut), dim=-1).to(torch.int32)


def quantize_pack_keys(
    x: torch.Tensor,
    bits: int,
    block: int,
    lut: torch.Tensor | None = None,
    clamp_lo: torch.Tensor | None = None,
    clamp_hi: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel key quantization over blocks of ``block`` tokens, then packing.

    Args:
        x: ``(B, H, T, D)`` keys, ``T`` a multiple of ``block``.
        bits: code width.
        block: tokens that share one (scale, zero) per channel.
        lut: optional ``(H, D, 2**bits)`` NUQ codebook in the code domain (fp16).
        clamp_lo, clamp_hi: optional ``(H, D)`` outlier thresholds; ``x`` is clamped to them first,
            so outliers do not stretch the range (they are stored separately, see
            :func:`kvbench.kernels.ops.split_outliers`).
        scale, zero: optional calibrated ``(H, D)`` scale and zero point, used for every block
            instead of the block's min/max.

    Returns:
        ``(words (B, H, T, W) int32, scale (B, H, T // block, D) fp16, zero (same) fp16)``.
    """
    B, H, T, D = x.shape
    xf = x.float()
    if clamp_lo is not None:
        xf = torch.maximum(torch.minimum(xf, clamp_hi.float()[:, None]), clamp_lo.float()[:, None])
    xb = xf.reshape(B, H, T // block, block, D)  # (B, H, NB, KB, D)
    if scale is None:
        s, z = _scale_zero(xb.amin(3), xb.amax(3), bits)  # (B, H, NB, D)
    else:
        s = torch.clamp(scale.float(), min=SCALE_FLOOR).half().float()[:, None].expand(B, H, T // block, D)
        z = zero.half().float()[:, None].expand(B, H, T // block, D)
    xn = (xb - z[:, :, :, None]) / s[:, :, :, None]
    lut_b = None if lut is None else lut.float()[None, :, None, None]  # (1, H, 1, 1, D, NC)
    codes = _codes(xn, bits, lut_b).reshape(B, H, T, D)
    return pack_codes(codes, bits), s.half().contiguous(), z.half().contiguous()


def quantize_pack_values(
    x: torch.Tensor, bits: int, group: int, lut: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token value quantization in groups of ``group`` channels, then packing.

    Args:
        x: ``(B, H, T, D)`` values.
        bits: code width.
        group: channels that share one (scale, zero); divides ``D``.
        lut: optional ``(H, D, 2**bits)`` NUQ codebook in the code domain (fp16).

    Returns:
        ``(words (B, H, T, W) int32, scale (B, H, T, D // group) fp16, zero (same) fp16)``.
    """
    B, H, T, D = x.shape
    xg = x.float().reshape(B, H, T, D // group, group)
    s, z = _scale_zero(xg.amin(-1), xg.amax(-1), bits)  # (B, H, T, NG)
    xn = ((xg - z[..., None]) / s[..., None]).reshape(B, H, T, D)
    lut_b = None if lut is None else lut.float()[None, :, None]  # (1, H, 1, D, NC)
    codes = _codes(xn, bits, lut_b)
    return pack_codes(codes, bits), s.half(), z.half()


def _levels(codes: torch.Tensor, lut: torch.Tensor | None, head_axis: int = 1) -> torch.Tensor:
    """Code -> level in the code domain (the code itself, or its centroid)."""
    if lut is None:
        return codes.float()
    lf = lut.float()  # (H, D, NC)
    H, D, NC = lf.shape
    c = codes.long().movedim(head_axis, 0)  # (H, B, T, D)
    idx = torch.arange(D, device=c.device) * NC + c
    out = torch.gather(lf.reshape(H, 1, 1, D * NC).expand(H, *c.shape[1:3], D * NC), -1, idx)
    return out.movedim(0, head_axis)


def dequantize_keys(words, scale, zero, bits: int, block: int, lut=None) -> torch.Tensor:
    """Inverse of :func:`quantize_pack_keys` (outliers not included).

    Args:
        words: ``(B, H, T, W)`` int32; scale, zero: ``(B, H, >= ceil(T / block), D)`` (the last
            block may be partial).

    Returns:
        ``(B, H, T, D)`` fp32.
    """
    B, H, T, _ = words.shape
    D = scale.shape[-1]
    lv = _levels(unpack_codes(words, bits, D), lut)  # (B, H, T, D)
    nb = -(-T // block)
    s = scale[:, :, :nb].float().repeat_interleave(block, 2)[:, :, :T]
    z = zero[:, :, :nb].float().repeat_interleave(block, 2)[:, :, :T]
    return lv * s + z


def dequantize_values(words, scale, zero, bits: int, lut=None) -> torch.Tensor:
    """Inverse of :func:`quantize_pack_values`.

    Args:
        words: ``(B, H, T, W)`` int32; scale, zero: ``(B, H, T, D // group)``.

    Returns:
        ``(B, H, T, D)`` fp32.
    """
    B, H, T, _ = words.shape
    ng = scale.shape[-1]
    D = words.shape[-1] * 32 // bits
    lv = _levels(unpack_codes(words, bits, D), lut).reshape(B, H, T, ng, D // ng)
    return (lv * scale[:, :, :T, :, None].float() + zero[:, :, :T, :, None].float()).reshape(B, H, T, D)


# ----------------------------------------------------------------------------------------------
# RoPE and decode attention
# ----------------------------------------------------------------------------------------------
def rope_at(k: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``(..., T, D)`` keys at positions ``pos (T,)`` (the one RoPE of :mod:`kvbench.model.anatomy`)."""
    return apply_rope(k, *rope_tables(pos, inv_freq))


def dequantize_stored_keys(kv, words=None) -> torch.Tensor:
    """Dense part of the packed keys in the stored domain (no outliers, channel affine or RoPE): ``(B, H, n, D)``
    fp32 of ``words`` (default: the first ``kv.n_packed`` tokens)."""
    words = kv.k_words[:, :, : kv.n_packed] if words is None else words
    if kv.key_axis == "token":
        return dequantize_values(words, kv.k_scale, kv.k_zero, kv.key_bits, kv.k_lut)
    return dequantize_keys(words, kv.k_scale, kv.k_zero, kv.key_bits, kv.key_block, kv.k_lut)


def _add_sparse(x: torch.Tensor, ptr, tok, ch, val, n: int, block: int) -> None:
    """Add the CSR outliers of the first ``n`` packed tokens to ``x (B, H, n, D)`` in place."""
    cnt = ptr[:, :, -(-n // block)].long()  # (B, H) entries so far (last block may be partial)
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            c = int(cnt[b, h])
            if c:
                x[b, h].index_put_((tok[b, h, :c].long(), ch[b, h, :c].long()), val[b, h, :c].float(), accumulate=True)


def dequantize_packed(kv) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed tokens of one store: ``(keys, values)``, each ``(B, H, n_packed, D)`` fp32, keys post-RoPE
    (at ``kv.positions`` when set; empty slots are garbage: mask them with ``positions >= 0``)."""
    n = kv.n_packed
    k = dequantize_stored_keys(kv)
    v = dequantize_values(kv.v_words[:, :, :n], kv.v_scale, kv.v_zero, kv.value_bits, kv.v_lut)
    if n > 0 and kv.ol_ptr is not None:
        _add_sparse(k, kv.ol_ptr, kv.ol_tok, kv.ol_ch, kv.ol_val, n, kv.key_block)
    if n > 0 and kv.vol_ptr is not None:
        _add_sparse(v, kv.vol_ptr, kv.vol_tok, kv.vol_ch, kv.vol_val, n, kv.key_block)
    if kv.k_chan is not None:
        k = k * kv.k_chan[0][:, None].float() + kv.k_chan[1][:, None].float()
    if kv.v_chan is not None:
        v = v * kv.v_chan[0][:, None].float() + kv.v_chan[1][:, None].float()
    if kv.inv_freq is not None:
        if kv.positions is None:
            k = rope_at(k, torch.arange(kv.n_sink, kv.n_sink + n, device=k.device), kv.inv_freq)
        else:  # one row at a time: positions differ between rows
            pos = kv.positions[:, :n].long().clamp_min(0)
            k = torch.stack([rope_at(k[b], pos[b], kv.inv_freq) for b in range(k.shape[0])])
    return k, v


def dequantize_all(kv) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 K/V of a :class:`~kvbench.kernels.ops.PackedKV` (or a mixed-width list of them) in token
    order: sink, packed, recent.

    Returns:
        ``(keys, values)``, each ``(B, H, n_sink + n_packed + n_recent, D)`` fp32, keys post-RoPE.
    """
    parts = list(kv) if isinstance(kv, (list, tuple)) else [kv]
    first = parts[0]
    if first.positions is None and len(parts) == 1:
        k, v = dequantize_packed(first)
    else:
        B, H, _, D = first.sink_k.shape
        n = int(sum((p.positions[0, : p.n_packed] >= 0).sum() for p in parts))  # every row holds n tokens
        k = torch.zeros(B, H, n, D, device=first.sink_k.device)
        v = torch.zeros_like(k)
        for p in parts:
            pk, pv = dequantize_packed(p)
            pos = p.positions[:, : p.n_packed].long()
            for b in range(B):
                ok = pos[b] >= 0
                k[b][:, pos[b][ok] - first.n_sink] = pk[b][:, ok]
                v[b][:, pos[b][ok] - first.n_sink] = pv[b][:, ok]
    keys = torch.cat([first.sink_k[:, :, : first.n_sink].float(), k, first.recent_k[:, :, : first.n_recent].float()], 2)
    vals = torch.cat([first.sink_v[:, :, : first.n_sink].float(), v, first.recent_v[:, :, : first.n_recent].float()], 2)
    return keys, vals


def decode_attention(q: torch.Tensor, kv, sm_scale: float | None = None) -> torch.Tensor:
    """One-token attention over a packed cache (fp32 math over the dequantized K/V).

    Args:
        q: ``(B, H_q, D)`` query of the newest token; ``H_q = n_rep * H_kv`` (GQA/MQA).
        kv: :class:`~kvbench.kernels.ops.PackedKV`, or a mixed-width list of them.
        sm_scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``(B, H_q, D)`` in ``q.dtype``.
    """
    B, Hq, D = q.shape
    keys, vals = dequantize_all(kv)  # (B, H_kv, T, D)
    rep = Hq // keys.shape[1]
    keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
    scale = D**-0.5 if sm_scale is None else sm_scale
    att = torch.softmax(torch.einsum("bhd,bhtd->bht", q.float(), keys) * scale, -1)
    return torch.einsum("bht,bhtd->bhd", att, vals).to(q.dtype)


def default_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Default RoPE inverse frequencies ``(D/2,)`` fp32."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


__all__ = [
    "bit_slices",
    "words_per_token",
    "pack_codes",
    "unpack_codes",
    "quantize_pack_keys",
    "quantize_pack_values",
    "dequantize_keys",
    "dequantize_values",
    "dequantize_all",
    "dequantize_packed",
    "dequantize_stored_keys",
    "rope_at",
    "decode_attention",
    "default_inv_freq",
]
