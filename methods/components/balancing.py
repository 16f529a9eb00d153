"""Per-channel K/V balancing: calibrated shifts and scales (SmoothQuant / Outlier Suppression+ style).

The cache stores ``Q((x - z) / s)`` and reads ``z + s * Q(...)``, so with quantization off the model is
unchanged; :func:`fold_channel_scales` does the equivalent folding into the attention weights.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Optional

import torch

from kvbench.quant import fake_quantize_affine



class Shift(StrEnum):
    """Per-channel shift rule: none, the midpoint of the calibration range, or its mean."""

    none = "none"
    mid = "mid"
    mean = "mean"


def channel_scales(x: torch.Tensor, alpha, tie_pairs: bool = False) -> torch.Tensor:
    """Per-channel scales ``s_j = m_j ** alpha`` (geometric mean 1) from calibration activations.

    Args:
        x: ``(N, H_kv, T, D)`` calibration keys or values of one layer.
        alpha: strength, a float or ``(H_kv,)`` per head; 0 gives all ones.
        tie_pairs: use the larger ``m`` of the rotary pair ``(j, j + D/2)`` for both channels.

    Returns:
        ``(H_kv, D)`` positive scales.
    """
    m = x.abs().amax(dim=(0, 2)).clamp_min(1e-5)  # (H_kv, D)
    if tie_pairs:
        half = m.shape[-1] // 2
        top = torch.maximum(m[..., :half], m[..., half:])
        m = torch.cat([top, top], dim=-1)
    a = torch.as_tensor(alpha, dtype=m.dtype).reshape(-1, 1)  # (1 or H_kv, 1)
    log_s = a * m.log()
    return (log_s - log_s.mean(-1, keepdim=True)).exp()


def channel_shift(x: torch.Tensor, rule: str) -> torch.Tensor:
    """Per-channel shift ``(H_kv, D)`` of calibration activations ``x (N, H_kv, T, D)``: ``mid`` =
    midpoint of the range, ``mean`` = mean."""
    if rule == "mid":
        return (x.amax(dim=(0, 2)) + x.amin(dim=(0, 2))) / 2
    if rule == "mean":
        return x.mean(dim=(0, 2))
    raise ValueError(f"shift rule must be mid or mean, got {rule!r}")


ALPHA_GRID = tuple(i / 8 for i in range(9))


def search_alpha(x: torch.Tensor, weight: Optional[torch.Tensor], bits: int, group_size: Optional[int],
                 tie_pairs: bool = False, grid=ALPHA_GRID, max_tokens: int = 2048) -> torch.Tensor:
    """Per-head scaling strength minimising the (Fisher-)weighted error of ``s * Q(x / s)``.

    The Outlier-Suppression+-style range search of QoKV's ``Scale_get`` step, with the loss
    measured by the diagonal Fisher information (squared gradients of the LM loss w.r.t. the
    activation, a second-order estimate of the loss increase) instead of a layer-output MSE.

    Args:
        x: ``(N, H_kv, T, D)`` calibration keys or values of one layer.
        weight: ``(N, H_kv, T, D)`` Fisher information of ``x`` (``None``: plain squared error).
        bits: bit width the error is measured at (per-token quantization, ``group_size`` channels).
        tie_pairs: tie over rotary pairs (as :func:`channel_scales`).
        grid: candidate strengths.
        max_tokens: tokens per head used for the search (an even subsample).

    Returns:
        ``(H_kv,)`` the best strength of each head.
    """
    N, H, T, D = x.shape
    flat = x.transpose(0, 1).reshape(H, N * T, D)  # (H_kv, N*T, D)
    w = None if weight is None else weight.transpose(0, 1).reshape(H, N * T, D)
    step = max(1, N * T // max_tokens)
    sub, wsub = flat[:, ::step], (None if w is None else w[:, ::step])
    errs = []
    for a in grid:
        s = channel_scales(x, a, tie_pairs)[:, None, :]  # (H_kv, 1, D)
        err = (fake_quantize_affine(sub / s, bits, dim=-1, group_size=group_size) * s - sub).pow(2)
        errs.append((err if wsub is None else err * wsub).sum(dim=(1, 2)))  # (H_kv,)
    best = torch.stack(errs).argmin(0)  # (H_kv,)
    return torch.tensor(grid, dtype=x.dtype)[best]


def fold_channel_scales(model, method) -> None:
    """Fold ``method``'s calibrated channel scales (per-layer ``key_scales`` / ``value_scales``
    ``(H_kv, D)`` or None, e.g. QoKV's) into the attention weights (in place).

    Keys: ``k_proj`` rows divided by ``s``, ``q_proj`` rows multiplied by ``s`` (repeated over the
    query heads of each KV head); values: ``v_proj`` rows divided by ``s``, ``o_proj`` input columns
    multiplied by ``s``. The model's outputs are unchanged (up to rounding); a cache then stores
    ``K / s`` and ``V / s`` directly. Needs post-RoPE scales tied over rotary pairs (or no RoPE),
    and attention without q/k norms.
    """
    from kvbench.model import attention_modules

    for layer, mod in enumerate(attention_modules(model)):
        heads = mod.config.num_attention_heads
        group = heads // (getattr(mod.config, "num_key_value_heads", None) or heads)
        o_proj = getattr(mod, "o_proj", None) or mod.out_proj  # OPT: out_proj
        with torch.no_grad():
            if method.key_scales is not None:
                s = method.key_scales[layer].to(mod.k_proj.weight)  # (H_kv, D)
                _scale_rows(mod.k_proj, 1 / s.flatten())
                _scale_rows(mod.q_proj, s.repeat_interleave(group, 0).flatten())
            if method.value_scales is not None:
                s = method.value_scales[layer].to(mod.v_proj.weight)
                _scale_rows(mod.v_proj, 1 / s.flatten())
                o_proj.weight.mul_(s.repeat_interleave(group, 0).flatten()[None, :])


def _scale_rows(linear: torch.nn.Linear, s: torch.Tensor) -> None:
    linear.weight.mul_(s[:, None])
    if linear.bias is not None:
        linear.bias.mul_(s)
