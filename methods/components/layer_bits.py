"""Per-layer (or per-layer-and-KV-head) bit widths under an average-bit budget (KVTuner-style).

At calibration every *unit* -- a layer's keys or values (``method.layer_bits=layer``), or one KV
head of them (``head``) -- is scored at each candidate width ``b`` by its Fisher-weighted
quantization error ``E_u(b) = sum F * (x - Q_b(x))^2`` on the calibration split (``F``: the squared
gradients of the LM loss, a second-order estimate of the loss increase; plain squared error
without ``calib.fisher``). ``Q_b`` is a proxy of the method's quantizer that needs no calibrated
state (the method supplies it). :func:`allocate` then starts every unit at the smallest width and
greedily gives one more bit to the unit with the largest error reduction, until the budget is spent.

Every unit holds the same number of elements, so the average code width over all quantized K/V
elements is the mean of the allocation. It equals ``method.bit_budget`` when ``budget * units`` is
an integer, else it is the closest achievable average below the budget (``floor(budget * U) / U``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Callable, Optional, Sequence

import torch

from kvbench.errors import UserError


class LayerBits(StrEnum):
    """``method.layer_bits``: one width for all (``none``), per layer and K/V, or per layer, K/V and KV head."""

    none = "none"
    layer = "layer"
    head = "head"


def candidate_widths(bits: int, choices: Optional[Sequence[int]], floor: int = 1) -> list[int]:
    """The widths a unit may get: ``choices`` if given, else ``kv.bits - 1 .. kv.bits + 1`` (at least ``floor``)."""
    widths = sorted({int(b) for b in choices} if choices else {max(floor, bits - 1), bits, bits + 1})
    if widths != list(range(widths[0], widths[-1] + 1)) or widths[0] < 1 or widths[-1] > 8:
        raise UserError(f"method.layer_bit_choices must be consecutive widths in 1..8, got {widths}")
    return widths


def unit_errors(xs: list[torch.Tensor], fisher: Optional[list[torch.Tensor]], widths: Sequence[int],
                quantize: Callable[[torch.Tensor, int], torch.Tensor], per_head: bool) -> torch.Tensor:
    """Fisher-weighted quantization error of every unit at every width.

    Args:
        xs: per layer, ``(N, H_kv, T, D)`` calibration keys or values (as quantized: rotated, pre-RoPE...).
        fisher: per layer, their squared gradients (same shapes), or ``None``.
        widths: candidate widths.
        quantize: ``(x, bits) -> x_hat`` the method's proxy quantizer.
        per_head: one unit per KV head instead of per layer.

    Returns:
        ``(L, n_widths)`` or ``(L, H_kv, n_widths)`` errors (float64).
    """
    out = []
    for i, x in enumerate(xs):
        w = fisher[i] if fisher is not None else torch.ones_like(x)
        errs = []
        for b in widths:
            e = (quantize(x, b).float() - x.float()).pow(2) * w  # (N, H_kv, T, D)
            errs.append(e.double().sum(dim=(0, 2, 3)) if per_head else e.double().sum().reshape(1))
        out.append(torch.stack(errs, -1))  # (H_kv or 1, n_widths)
    errors = torch.stack(out)  # (L, H_kv or 1, n_widths)
    return errors if per_head else errors[:, 0]


def allocate(errors: torch.Tensor, widths: Sequence[int], budget: float) -> torch.Tensor:
    """Greedy widths under an average budget.

    Args:
        errors: ``(..., n_widths)`` error of each unit at each of the consecutive ``widths``.
        widths: candidate widths, ascending, consecutive.
        budget: average width over the units.

    Returns:
        ``errors.shape[:-1]`` int64 widths whose mean is ``floor(budget * U) / U`` (``U`` units),
        capped at ``max(widths)``.
    """
    shape = errors.shape[:-1]
    e = errors.reshape(-1, errors.shape[-1]).double()  # (U, n_widths)
    U = e.shape[0]
    if budget < widths[0]:
        raise UserError(f"method.bit_budget={budget} is below the smallest width {widths[0]}")
    level = torch.zeros(U, dtype=torch.long)  # index into widths
    steps = min(int(budget * U + 1e-9) - widths[0] * U, (len(widths) - 1) * U)
    for _ in range(steps):
        top = level < len(widths) - 1
        idx = level.clamp_max(len(widths) - 2)
        gain = e.gather(1, idx[:, None])[:, 0] - e.gather(1, idx[:, None] + 1)[:, 0]
        gain = torch.where(top, gain, torch.full_like(gain, -torch.inf))
        level[int(gain.argmax())] += 1
    return (torch.tensor(list(widths))[level]).reshape(shape)
