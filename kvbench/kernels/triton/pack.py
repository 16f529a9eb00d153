"""Pack / unpack codes: Triton twins of :func:`kvbench.kernels.reference.pack_codes` / ``unpack_codes``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import words_per_token
from .common import pack_tile, unpack_tile

_ROWS = 16  # token rows per program


@triton.jit
def _pack_kernel(c_ptr, w_ptr, n_rows, BITS: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    m = rows < n_rows
    code = tl.load(c_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], mask=m[:, None], other=0).to(tl.int32)
    pack_tile(code, w_ptr + rows * W, m, BITS, D, BT)


@triton.jit
def _unpack_kernel(w_ptr, c_ptr, n_rows, BITS: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    m = rows < n_rows
    code = unpack_tile(w_ptr + rows * W, m, BITS, D, BT)
    tl.store(c_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], code, mask=m[:, None])


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(..., D)`` codes -> ``(..., bits * D / 32)`` int32 words."""
    d = codes.shape[-1]
    w = words_per_token(bits, d)
    c = codes.reshape(-1, d).to(torch.int32).contiguous()
    out = torch.empty(c.shape[0], w, dtype=torch.int32, device=c.device)
    _pack_kernel[(triton.cdiv(c.shape[0], _ROWS),)](c, out, c.shape[0], BITS=bits, D=d, W=w, BT=_ROWS)
    return out.reshape(*codes.shape[:-1], w)


def unpack_codes(words: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """``(..., W)`` int32 words -> ``(..., D)`` int32 codes."""
    w = words.shape[-1]
    ws = words.reshape(-1, w).contiguous()
    out = torch.empty(ws.shape[0], head_dim, dtype=torch.int32, device=ws.device)
    _unpack_kernel[(triton.cdiv(ws.shape[0], _ROWS),)](ws, out, ws.shape[0], BITS=bits, D=head_dim, W=w, BT=_ROWS)
    return out.reshape(*words.shape[:-1], head_dim)
