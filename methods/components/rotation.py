"""Randomized Hadamard rotation of keys and/or values over ``head_dim`` (QuaRot / SpinQuant style).

``R = H_D diag(s) / sqrt(D)``: the Sylvester Hadamard matrix of order ``D`` (a power of two) times
random signs ``s`` drawn from ``method.rotation_seed``. ``R`` is orthonormal, so a rotation spreads
an outlier channel over all channels without changing any product: ``q . k = (R q) . (R k)`` and
``sum_t p_t v_t = R^T sum_t p_t (R v_t)``.

Deployment view: the cache stores ``Q(R k)`` and the query is rotated (scores unchanged); it stores
``Q(R v)`` and the attention output is rotated back (or ``R^T`` is folded into ``o_proj``).
The simulated backend computes the same numbers the other way round: rotate, quantize, dequantize,
rotate back (``R^T Q(R x)``), exact up to float rounding because ``R^T R = I``. Keys are rotated in
whatever space the method quantizes them: pre-RoPE when the method's ``pre_rope`` (then only the
read-back path can undo it, since ``R`` does not commute with RoPE), post-RoPE otherwise.

The transform is the fast Walsh-Hadamard transform, ``O(D log D)`` per vector (:func:`fwht`).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Callable

import torch

from kvbench.errors import UserError


class Rotation(StrEnum):
    """``method.rotation``: no rotation, or a randomized Hadamard transform."""

    none = "none"
    hadamard = "hadamard"


class Rotate(StrEnum):
    """``method.rotate``: what the rotation applies to."""

    keys = "keys"
    values = "values"
    both = "both"


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last axis: ``x @ H_D`` with ``H_D`` the
    Sylvester Hadamard matrix (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, symmetric).

    Args:
        x: ``(..., D)``, ``D`` a power of two.

    Returns:
        ``(..., D)``, same dtype.
    """
    D = x.shape[-1]
    if D & (D - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two size, got {D}")
    y = x.reshape(-1, D)
    h = 1
    while h < D:  # butterflies (i, i + h) within blocks of 2h
        y = y.view(-1, D // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(x.shape)


class HadamardRotation:
    """``R = H_D diag(s) / sqrt(D)`` with seeded random signs ``s``.

    Args:
        dim: ``D`` (head_dim), a power of two.
        seed: seed of the signs.
    """

    def __init__(self, dim: int, seed: int):
        if dim & (dim - 1):
            raise UserError(f"method.rotation=hadamard needs a power-of-two head_dim, the model has {dim}")
        g = torch.Generator().manual_seed(int(seed))
        self.signs = torch.randint(0, 2, (dim,), generator=g).float() * 2 - 1  # (D,)
        self.scale = 1 / math.sqrt(dim)
        self._signs_on = {self.signs.device: self.signs}  # device -> the signs there (copied once, not per layer)

    def _signs(self, device: torch.device) -> torch.Tensor:
        if device not in self._signs_on:
            self._signs_on[device] = self.signs.to(device)
        return self._signs_on[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` of every vector of ``x (..., D)`` (computed in fp32, returned in ``x``'s dtype)."""
        return (fwht(x.float() * self._signs(x.device)) * self.scale).to(x.dtype)  # H symmetric: (R x)^T = x^T diag(s) H

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``R^T y`` of every vector of ``y (..., D)``."""
        return (fwht(y.float()) * self.scale * self._signs(y.device)).to(y.dtype)

    def matrix(self) -> torch.Tensor:
        """``R`` as a dense ``(D, D)`` matrix (row ``i`` = output channel ``i``)."""
        return self.forward(torch.eye(len(self.signs))).T


class KVRotation:
    """The rotation component of a method: which of K/V it rotates, around the method's quantizer.

    Args:
        kind: ``method.rotation``.
        rotate: ``method.rotate``.
        seed: ``method.rotation_seed``.
        head_dim: the model's ``head_dim``.
    """

    def __init__(self, kind: str, rotate: str, seed: int, head_dim: int):
        on = kind == Rotation.hadamard
        self.keys = on and rotate in (Rotate.keys, Rotate.both)
        self.values = on and rotate in (Rotate.values, Rotate.both)
        self.h = HadamardRotation(head_dim, seed) if on else None

    def around(self, which: str, x: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``R^T quantize(R x)`` for ``which`` in ``{"k", "v"}`` when it is rotated, else ``quantize(x)``;
        ``x (B, H_kv, T, D)``."""
        if not (self.keys if which == "k" else self.values):
            return quantize(x)
        return self.h.inverse(quantize(self.h.forward(x))).to(x.dtype)

    def statistics(self, stats: dict) -> dict:
        """Calibration statistics (:func:`kvbench.calibration.collect`) as the quantizer sees them.

        Keys (pre- and post-RoPE) and values are rotated exactly. The squared gradients of a rotated
        activation would need the signed gradients (``(R g)_i^2``); the statistics hold ``g_j^2``
        only, so each element gets the token's mean ``mean_j g_j^2``: the expectation of
        ``(R g)_i^2`` over the random signs (the cross terms ``s_j s_k``, ``j != k``, average to 0).
        """
        if self.h is None:
            return stats
        out = dict(stats)
        for name in ("keys", "keys_post", "values"):
            if name in stats and (self.keys if name.startswith("keys") else self.values):
                out[name] = [self.h.forward(x) for x in stats[name]]
                f = f"fisher_{name}"
                if f in stats:
                    out[f] = [g.mean(-1, keepdim=True).expand_as(g).contiguous() for g in stats[f]]
        return out
