"""Pure quantization primitives (no model, no state), in the style of torchao's ``quantize_affine``.

Every function takes an explicit reduction ``dim`` (the axis the statistics are taken over) and a
``group_size`` (how many consecutive elements along ``dim`` share one scale). For a K/V tensor of
shape ``(B, H_kv, T, D)``:

=================  ========  ============  ==========================================
granularity        dim       group_size    one (scale, zero) per
=================  ========  ============  ==========================================
per-token          -1        None          token and head (D elements)
per-token grouped  -1        g (g | D)     token, head and group of g channels
per-channel        -2        None          channel and head (all T tokens)
per-channel block  -2        g             channel, head and block of g tokens
=================  ========  ============  ==========================================

Quantization is asymmetric: ``q = clamp(round((x - lo) / scale), 0, 2**bits - 1)`` and
``x_hat = q * scale + lo`` with ``scale = (hi - lo) / (2**bits - 1)``; ``lo`` is the zero point
(stored in fp16, as KIVI does), so one group costs two fp16 numbers.
"""

from __future__ import annotations

import torch

SCALE_ZERO_BITS = 32  # one fp16 scale + one fp16 zero point per group


def _grouped(x: torch.Tensor, dim: int, group_size: int | None) -> tuple[torch.Tensor, int]:
    """Move ``dim`` last and split it into ``(n_groups, group_size)``; returns the view and ``dim``."""
    dim = dim % x.dim()
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    g = n if group_size is None else group_size
    if n % g != 0:
        raise ValueError(f"group size {g} does not divide the quantized axis of length {n}")
    return x.reshape(*x.shape[:-1], n // g, g), dim


def _ungrouped(xg: torch.Tensor, dim: int) -> torch.Tensor:
    return xg.flatten(-2).movedim(-1, dim)


def quantize_affine(
    x: torch.Tensor, bits: int, dim: int = -1, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantization.

    Args:
        x: tensor of any shape, e.g. ``(B, H_kv, T, D)``.
        bits: code width (1..8).
        dim: axis the statistics are reduced over (see the module table).
        group_size: elements along ``dim`` that share one scale; ``None`` for the whole axis.

    Returns:
        ``(codes, scale, lo)``: ``codes`` (uint8) has ``x``'s shape; ``scale`` and ``lo`` have
        ``x``'s shape with ``dim`` replaced by the number of groups.
    """
    xg, d = _grouped(x, dim, group_size)
    lo = xg.amin(-1, keepdim=True)
    hi = xg.amax(-1, keepdim=True)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    codes = torch.clamp(torch.round((xg - lo) / scale), 0, qmax).to(torch.uint8)
    return _ungrouped(codes, d), scale.squeeze(-1).movedim(-1, d), lo.squeeze(-1).movedim(-1, d)


def dequantize_affine(
    codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dim: int = -1, dtype=torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_affine` (the group size is implied by the shapes)."""
    d = dim % codes.dim()
    n_groups = scale.shape[d]
    cg, _ = _grouped(codes, d, codes.shape[d] // n_groups)
    s = scale.movedim(d, -1).unsqueeze(-1)
    z = lo.movedim(d, -1).unsqueeze(-1)
    return _ungrouped(cg.to(dtype) * s.to(dtype) + z.to(dtype), d)


def fake_quantize_affine(
    x: torch.Tensor, bits: int, dim: int = -1, group_size: int | None = None
) -> torch.Tensor:
    """Quantize then dequantize (simulated quantization); same shape and dtype as ``x``.

    ``bits >= 16`` returns ``x`` unchanged.
    """
    if bits >= 16:
        return x
    codes, scale, lo = quantize_affine(x.float(), bits, dim, group_size)
    return dequantize_affine(codes, scale, lo, dim).to(x.dtype)
