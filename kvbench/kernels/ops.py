"""Public kernel API: each op dispatches to its Triton kernel or its PyTorch reference twin.

``impl="triton"`` runs :mod:`kvbench.kernels.triton` (CUDA, or a CPU under ``TRITON_INTERPRET=1``);
``impl="reference"`` runs :mod:`kvbench.kernels.reference`; ``impl="auto"`` (``kv.kernel.impl``'s default)
is Triton on a CUDA device, else the reference. Both take and return the same tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import reference

BACKEND_ERROR = (
    "kv.backend=kernel needs a CUDA GPU with Triton, or TRITON_INTERPRET=1 for the (slow) interpreter"
)
IMPLS = ("auto", "triton", "reference")


def triton_available() -> bool:
    """True where the Triton kernels can run: a CUDA GPU, or ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def fused_simulated(x: torch.Tensor, group: int | None = None) -> bool:
    """Whether the simulated backend's quantizers run fused (:mod:`.triton.simulated`) on ``x``: CUDA tensors
    with a power-of-two head_dim (and channel ``group``), Triton installed; the PyTorch definitions otherwise
    (CPU, other shapes, and the tests' reference)."""
    D, G = x.shape[-1], group or x.shape[-1]
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0  # noqa: E731
    return x.is_cuda and D >= 16 and pow2(D) and pow2(G) and G <= D and triton_available()


def require_triton() -> None:
    """Raise the one-line backend error unless :func:`triton_available`."""
    if not triton_available():
        raise RuntimeError(BACKEND_ERROR)


def resolve_impl(impl: str, device) -> str:
    """``"triton"`` or ``"reference"``: ``impl`` itself, or for ``"auto"`` Triton on a CUDA ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "reference"
    return impl


def _impl(impl: str, device):
    if resolve_impl(impl, device) == "reference":
        return reference
    require_triton()
    from . import triton

    return triton


@dataclass
class PackedKV:
    """One layer's packed K/V, as the decode-attention kernels read it (all ``(B, H_kv, ...)``).

    Buffers have a capacity along the token axis; only the first ``n_*`` entries are valid.
    ``n_packed`` need not be a multiple of ``key_block`` (calibrated key scales pack token by token):
    the last block, and the last tile, may be partial.
    Token order: ``sink`` (positions ``0..n_sink-1``), ``packed`` (``n_sink..``), ``recent``.

    Attributes:
        k_words: ``(B, H, T_cap, key_bits * D / 32)`` int32 key codes.
        k_scale, k_zero: ``(B, H, T_cap / key_block, D)`` fp16, one per channel per key block.
        v_words: ``(B, H, T_cap, value_bits * D / 32)`` int32 value codes.
        v_scale, v_zero: ``(B, H, T_cap, D / value_group)`` fp16, one per token per channel group.
        sink_k, sink_v: ``(B, H, S_cap, D)`` model dtype (post-RoPE keys).
        recent_k, recent_v: ``(B, H, R_cap, D)`` model dtype (post-RoPE keys).
        k_lut, v_lut: optional ``(H, D, 2**bits)`` fp16 NUQ codebooks (code domain).
        ol_ptr: optional ``(B, H, T_cap / key_block + 1)`` int32 CSR offsets of each key block's
            outliers in ``ol_tok`` / ``ol_ch`` / ``ol_val`` (``(B, H, OL_cap)``: int32 packed-token
            index, int16 channel, fp16 residual ``x - dequant(quant(clamp(x)))``).
        inv_freq: optional ``(D/2,)`` fp32; when set, packed keys are pre-RoPE and rotated after
            dequantization at position ``n_sink + index`` (or ``positions``).
        key_axis: ``"channel"`` (the default: ``k_scale``/``k_zero`` per key block and channel) or
            ``"token"``: ``k_scale``/``k_zero`` are ``(B, H, T_cap, D / key_group)``, one per token and
            group of channels, like the values.
        positions: optional ``(B, T_cap)`` int32 absolute position of every packed token, ``-1`` for an
            empty slot (masked). Set on the stores of a mixed-width cache (a list of :class:`PackedKV`,
            one per width pair: QoKV's token groups); ``None``: positions ``n_sink + index``, all valid.
        k_chan, v_chan: optional ``(2, H, D)`` fp32 channel ``(scale, shift)``: the stored codes are of
            ``(x - shift) / scale``. Keys are mapped back in the key tile (before RoPE); values are folded
            into the output (``shift + scale * sum_t p_t v_t``, the ``p_t`` summing to one).
        vol_ptr, vol_tok, vol_ch, vol_val: optional sparse value outliers, the same CSR layout as the key
            outliers (``ol_*``): per key block offsets, then packed-token index, channel and fp16 residual
            ``x - dequant(quant(x))`` in the stored domain.
        recent_len, packed_len: optional ``(1,)`` int64 on the GPU, ``n_recent`` and ``n_packed`` as the Triton
            kernels read them (the cache keeps them there so that a decode step can be replayed as a CUDA
            graph); ``None``: made from the ints at each launch.
    """

    k_words: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_words: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    n_packed: int
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    n_sink: int
    recent_k: torch.Tensor
    recent_v: torch.Tensor
    n_recent: int
    key_bits: int
    value_bits: int
    key_block: int
    k_lut: torch.Tensor | None = None
    v_lut: torch.Tensor | None = None
    ol_ptr: torch.Tensor | None = None
    ol_tok: torch.Tensor | None = None
    ol_ch: torch.Tensor | None = None
    ol_val: torch.Tensor | None = None
    inv_freq: torch.Tensor | None = None
    key_axis: str = "channel"
    positions: torch.Tensor | None = None
    k_chan: torch.Tensor | None = None
    v_chan: torch.Tensor | None = None
    vol_ptr: torch.Tensor | None = None
    vol_tok: torch.Tensor | None = None
    vol_ch: torch.Tensor | None = None
    vol_val: torch.Tensor | None = None
    recent_len: torch.Tensor | None = None
    packed_len: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        """True for the formats every decode path reads (no per-token keys, positions, channel affine
        or value outliers); the others go to the generic ``split_k`` path."""
        return (self.key_axis == "channel" and self.positions is None and self.k_chan is None
                and self.v_chan is None and self.vol_ptr is None)


def pack_codes(codes: torch.Tensor, bits: int, impl: str = "triton") -> torch.Tensor:
    """``(..., D)`` codes -> ``(..., bits * D / 32)`` int32 words. See :func:`reference.pack_codes`."""
    return _impl(impl, codes.device).pack_codes(codes, bits)


def unpack_codes(words: torch.Tensor, bits: int, head_dim: int, impl: str = "triton") -> torch.Tensor:
    """``(..., W)`` int32 words -> ``(..., D)`` int32 codes. See :func:`reference.unpack_codes`."""
    return _impl(impl, words.device).unpack_codes(words, bits, head_dim)


def quantize_pack_keys(x, bits, block, lut=None, clamp_lo=None, clamp_hi=None, scale=None, zero=None,
                       impl: str = "triton"):
    """Per-channel (per key block) key quantize-and-pack. See :func:`reference.quantize_pack_keys`."""
    return _impl(impl, x.device).quantize_pack_keys(x, bits, block, lut, clamp_lo, clamp_hi, scale, zero)


def quantize_pack_values(x, bits, group, lut=None, impl: str = "triton"):
    """Per-token grouped value quantize-and-pack. See :func:`reference.quantize_pack_values`."""
    return _impl(impl, x.device).quantize_pack_values(x, bits, group, lut)


def decode_attention(q: torch.Tensor, kv: PackedKV, sm_scale: float | None = None, impl: str = "triton",
                     path: str = "auto", **tuning) -> torch.Tensor:
    """One query token per sequence attending to a packed cache.

    Args:
        q: ``(B, H_q, D)``, ``H_q = n_rep * H_kv``.
        kv: the layer's :class:`PackedKV`, or a list of them (a mixed-width cache: one store per width
            pair with ``positions``; the sink and recent tokens in the first).
        sm_scale: softmax scale (default ``D ** -0.5``).
        impl: ``"auto"``, ``"triton"`` or ``"reference"``.
        path: Triton decode path: ``"auto"`` (the tuning table) or a name in
            :data:`kvbench.kernels.triton.PATHS`; ignored by the reference.
        **tuning: Triton launch parameters replacing the table's (see
            :func:`kvbench.kernels.triton.decode_attention`).

    Returns:
        ``(B, H_q, D)`` in ``q.dtype``.
    """
    if resolve_impl(impl, q.device) == "reference":
        return reference.decode_attention(q, kv, sm_scale)
    return _impl(impl, q.device).decode_attention(q, kv, sm_scale, path=path, **tuning)


def codebook_from_unit(lut_pm1: torch.Tensor, bits: int) -> torch.Tensor:
    """Map a NUQ codebook normalised to ``[-1, 1]`` (KVQuant style) to this module's code domain.

    The kernels dequantize ``x_hat = scale * lut[code] + zero`` with the same min/max ``scale`` and
    ``zero`` as uniform quantization, so uniform is ``lut = [0, 1, ..., 2**bits - 1]`` and a
    ``[-1, 1]`` codebook ``c`` becomes ``(c + 1) / 2 * (2**bits - 1)``.
    """
    return ((lut_pm1.float() + 1) / 2 * (2**bits - 1)).half()


def split_outliers(x: torch.Tensor, x_hat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Dense-and-sparse split of keys against per-channel thresholds.

    Args:
        x: ``(B, H, T, D)`` keys as quantized (pre- or post-RoPE, like the dense part).
        x_hat: ``(B, H, T, D)`` dequantized dense part (quantized from ``x`` clamped to lo..hi).
        lo, hi: ``(H, D)`` thresholds.

    Returns:
        ``(mask (B, H, T, D) bool, residual (B, H, T, D) fp16)``; the residual ``x - x_hat`` is
        what the sparse store keeps at the masked positions.
    """
    mask = (x < lo[:, None].to(x.dtype)) | (x > hi[:, None].to(x.dtype))
    return mask, (x.float() - x_hat.float()).half()


def token_outliers(x: torch.Tensor, frac: float, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KVQuant's per-token dense-and-sparse split: the outliers of each token over all heads and channels.

    Args:
        x: ``(B, H, T, D)``.
        frac: fraction kept sparse (top ``frac / 2`` and bottom ``frac / 2`` of each token's ``H * D``).
        group: channels per range of the dense part.

    Returns:
        ``(mask (B, H, T, D) bool, x clamped to each token group's range of its dense values)``: packing
        the clamped tensor gives the dense part's (scale, zero); the residual at the mask is sparse.
    """
    from kvbench.quant import outlier_mask

    B, H, T, D = x.shape
    xf = x.float()
    mask = outlier_mask(xf.transpose(1, 2).reshape(B, T, H * D), frac).view(B, T, H, D).transpose(1, 2)
    xg, mg = xf.view(B, H, T, D // group, group), mask.view(B, H, T, D // group, group)
    lo = xg.masked_fill(mg, float("inf")).amin(-1, keepdim=True)  # (B, H, T, NG, 1)
    hi = xg.masked_fill(mg, float("-inf")).amax(-1, keepdim=True)
    return mask, torch.maximum(torch.minimum(xg, hi), lo).view(B, H, T, D)


def outlier_csr(mask: torch.Tensor, residual: torch.Tensor, block: int, tok_offset: int = 0):
    """COO/CSR arrays of a dense-and-sparse split over whole key blocks.

    Args:
        mask, residual: ``(B, H, T, D)`` from :func:`split_outliers`, ``T`` a multiple of ``block``.
        block: key block size.
        tok_offset: packed-token index of the first of the ``T`` tokens.

    Returns:
        ``(counts (B, H, T / block) int32, tok (B, H, n_max) int32, ch (B, H, n_max) int16,
        val (B, H, n_max) fp16, n (B, H) int64)``: per-(b, h) entries sorted by token, padded to
        the largest count ``n_max``.
    """
    B, H, T, D = mask.shape
    counts = mask.reshape(B, H, T // block, block * D).sum(-1).to(torch.int32)  # (B, H, NB)
    n = counts.sum(-1).long()  # (B, H)
    n_max = max(int(n.max()) if n.numel() else 0, 1)
    idx = mask.reshape(B * H, T * D).nonzero()  # (K, 2): row, flat (t, d), row-major sorted
    row, flat = idx[:, 0], idx[:, 1]
    start = torch.cumsum(n.reshape(-1), 0) - n.reshape(-1)
    rank = torch.arange(row.numel(), device=mask.device) - start[row]
    tok = torch.zeros(B * H, n_max, dtype=torch.int32, device=mask.device)
    ch = torch.zeros(B * H, n_max, dtype=torch.int16, device=mask.device)
    val = torch.zeros(B * H, n_max, dtype=torch.float16, device=mask.device)
    tok[row, rank] = (flat // D + tok_offset).to(torch.int32)
    ch[row, rank] = (flat % D).to(torch.int16)
    val[row, rank] = residual.reshape(B * H, T * D)[row, flat]
    return counts, tok.reshape(B, H, n_max), ch.reshape(B, H, n_max), val.reshape(B, H, n_max), n


def _csr(mask, res, block, B, H, device):
    counts, tok, ch, val, _ = outlier_csr(mask, res, block)
    ptr = torch.zeros(B, H, counts.shape[-1] + 1, dtype=torch.int32, device=device)
    ptr[:, :, 1:] = torch.cumsum(counts, -1)
    return ptr, tok, ch, val


def _chan(x, chan):
    """``(x - shift) / scale`` per channel, ``chan (2, H, D)``."""
    return x if chan is None else (x.float() - chan[1][:, None]) / chan[0][:, None]


def build_packed_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    key_bits: int = 4,
    value_bits: int = 4,
    key_block: int = 64,
    value_group: int = 64,
    n_sink: int = 0,
    n_recent: int = 0,
    k_lut: torch.Tensor | None = None,
    v_lut: torch.Tensor | None = None,
    k_clamp: tuple[torch.Tensor, torch.Tensor] | None = None,
    inv_freq: torch.Tensor | None = None,
    impl: str = "triton",
    key_group: int | None = None,
    k_chan: torch.Tensor | None = None,
    v_chan: torch.Tensor | None = None,
    key_outlier_frac: float = 0.0,
    value_outlier_frac: float = 0.0,
) -> PackedKV:
    """Pack a whole K/V sequence at once (tests, benchmarks): sink | packed | recent.

    Args:
        k, v: ``(B, H, T, D)``; ``T - n_sink - n_recent`` must be a multiple of ``key_block``.
            Keys are post-RoPE; with ``inv_freq`` the packed part is un-rotated first (pre-RoPE).
        k_clamp: optional ``(lo, hi)`` per-channel ``(H, D)`` outlier thresholds for keys.
        key_group: per-token keys in groups of ``key_group`` channels (``key_axis="token"``; ``None``:
            per-channel keys in blocks of ``key_block`` tokens).
        k_chan, v_chan: optional ``(2, H, D)`` channel ``(scale, shift)`` (see :class:`PackedKV`).
        key_outlier_frac, value_outlier_frac: per-token sparse outliers (:func:`token_outliers`; keys:
            only with ``key_group``).
        other args: see :class:`PackedKV` and :func:`quantize_pack_keys`.

    Returns:
        A :class:`PackedKV` whose capacities equal its contents.
    """
    B, H, T, D = k.shape
    n_packed = T - n_sink - n_recent
    if n_packed % key_block:
        raise ValueError(f"{n_packed} packed tokens is not a multiple of key_block={key_block}")
    kp, vp = k[:, :, n_sink : n_sink + n_packed], v[:, :, n_sink : n_sink + n_packed]
    if inv_freq is not None:
        pos = torch.arange(n_sink, n_sink + n_packed, device=k.device)
        kp = reference.rope_at(kp.float(), pos, -inv_freq.float())  # rotate back: pre-RoPE
    kp, vp = _chan(kp, k_chan), _chan(vp, v_chan)
    lo, hi = k_clamp if k_clamp is not None else (None, None)
    k_mask = v_mask = None
    if key_group is None:
        kw, ks, kz = quantize_pack_keys(kp, key_bits, key_block, k_lut, lo, hi, impl=impl)
    else:
        kq = kp
        if key_outlier_frac > 0:
            k_mask, kq = token_outliers(kp, key_outlier_frac, key_group)
        kw, ks, kz = quantize_pack_values(kq, key_bits, key_group, k_lut, impl=impl)
    vq = vp
    if value_outlier_frac > 0:
        v_mask, vq = token_outliers(vp, value_outlier_frac, value_group)
    vw, vs, vz = quantize_pack_values(vq, value_bits, value_group, v_lut, impl=impl)
    kv = PackedKV(
        kw, ks, kz, vw, vs, vz, n_packed,
        k[:, :, :n_sink].contiguous(), v[:, :, :n_sink].contiguous(), n_sink,
        k[:, :, T - n_recent :].contiguous(), v[:, :, T - n_recent :].contiguous(), n_recent,
        key_bits, value_bits, key_block, k_lut, v_lut,
        inv_freq=None if inv_freq is None else inv_freq.float().contiguous(),
        key_axis="channel" if key_group is None else "token",
        k_chan=None if k_chan is None else k_chan.float().contiguous(),
        v_chan=None if v_chan is None else v_chan.float().contiguous(),
    )
    if k_clamp is not None:
        k_hat = reference.dequantize_keys(kw, ks, kz, key_bits, key_block, k_lut)
        k_mask, _ = split_outliers(kp.float(), k_hat, lo, hi)
    if k_mask is not None:
        k_hat = reference.dequantize_stored_keys(kv, kw)
        kv.ol_ptr, kv.ol_tok, kv.ol_ch, kv.ol_val = _csr(k_mask, (kp.float() - k_hat).half(), key_block, B, H, k.device)
    if v_mask is not None:
        v_hat = reference.dequantize_values(vw, vs, vz, value_bits, v_lut)
        kv.vol_ptr, kv.vol_tok, kv.vol_ch, kv.vol_val = _csr(v_mask, (vp.float() - v_hat).half(), key_block, B, H,
                                                             k.device)
    return kv


def build_mixed_kv(k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor, group_bits: list[tuple[int, int]],
                   n_sink: int = 0, n_recent: int = 0, key_block: int = 64, **kw) -> list[PackedKV]:
    """Pack a whole sequence as a mixed-width cache (tests, benchmarks): one store per distinct
    ``(key_bits, value_bits)`` pair of ``group_bits``, each holding its tokens with their ``positions``.

    Args:
        k, v: ``(B, H, T, D)`` post-RoPE keys and values.
        groups: ``(B, T - n_sink - n_recent)`` int64 token group of every packed token.
        group_bits: ``(key_bits, value_bits)`` of each group.
        key_block: as :func:`build_packed_kv` (each store is padded to a multiple of it; pad slots have
            position ``-1``).
        **kw: the other arguments of :func:`build_packed_kv` (``inv_freq``, ``key_group``, ``k_chan``, ...).

    Returns:
        ``[PackedKV, ...]``, the first holding the sink and recent tokens.
    """
    B, H, T, D = k.shape
    n_packed = T - n_sink - n_recent
    pairs = sorted(set(map(tuple, group_bits)))
    inv_freq = kw.pop("inv_freq", None)
    kp = k[:, :, n_sink : n_sink + n_packed]
    if inv_freq is not None:  # un-rotate here: the stores' tokens are not contiguous
        kp = reference.rope_at(kp.float(), torch.arange(n_sink, n_sink + n_packed, device=k.device),
                               -inv_freq.float()).to(k.dtype)
    parts = []
    for j, (kb, vb) in enumerate(pairs):
        sel = torch.zeros_like(groups, dtype=torch.bool)
        for g, pair in enumerate(group_bits):
            if tuple(pair) == (kb, vb):
                sel |= groups == g
        idx, pos = select_tokens(sel, n_sink, key_block)  # (B, m)
        take = lambda x: torch.gather(x, 2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))  # noqa: E731
        sk, sv = (k[:, :, :n_sink], v[:, :, :n_sink]) if j == 0 else (k[:, :, :0], v[:, :, :0])
        rk, rv = (k[:, :, T - n_recent :], v[:, :, T - n_recent :]) if j == 0 else (k[:, :, :0], v[:, :, :0])
        part = build_packed_kv(torch.cat([sk, take(kp), rk], 2), torch.cat([sv, take(v[:, :, n_sink:]), rv], 2),
                               kb, vb, key_block, n_sink=sk.shape[2], n_recent=rk.shape[2], **kw)
        part.positions = pos
        part.inv_freq = None if inv_freq is None else inv_freq.float().contiguous()
        parts.append(part)
    return parts


def select_tokens(sel: torch.Tensor, offset: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices of the selected tokens of each row, padded to a common length.

    Args:
        sel: ``(B, n)`` bool.
        offset: absolute position of token 0.
        multiple: pad the length to a multiple of this.

    Returns:
        ``(idx (B, m) int64, positions (B, m) int32)``: the selected tokens in order, then padding (index
        of the row's first token, position ``-1``).
    """
    B, n = sel.shape
    counts = sel.sum(1)
    m = int(counts.max()) if n else 0
    m = -(-m // multiple) * multiple
    order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)  # selected first, in order
    if m > n:
        order = torch.cat([order, order.new_zeros(B, m - n)], 1)
    idx = order[:, :m]
    valid = torch.arange(m, device=sel.device)[None] < counts[:, None]
    idx = torch.where(valid, idx, 0)
    pos = torch.where(valid, idx + offset, -1).to(torch.int32)
    return idx, pos
