"""The anatomy of a decoder that kvbench needs: its attention modules and the one RoPE.

``apply_rope`` / ``invert_rope`` work on ``(B, H, T, D)`` with the rotate-half layout of Llama-style
models (transformers' ``rotate_half``); the cache, calibration and the kernels' reference twins all use
these two functions.
"""

from __future__ import annotations

import torch

from kvbench.errors import UserError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _heads(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 3 and x.dim() == 4 else t  # (B, T, D) -> (B, 1, T, D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x (B, H, T, D)`` with ``cos, sin (B, T, D)`` as the model's rotary module
    returns them (or ``x (..., T, D)`` with tables ``(T, D)``, see :func:`rope_tables`); rotate-half layout."""
    return x * _heads(cos, x) + rotate_half(x) * _heads(sin, x)


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_rope` (a rotation by the opposite angle)."""
    return x * _heads(cos, x) - rotate_half(x) * _heads(sin, x)


def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(T, D)`` fp32, of positions ``pos (T,)`` and inverse frequencies ``(D/2,)``."""
    ang = pos.float()[:, None] * inv_freq.float()[None, :]  # (T, D/2)
    ang = torch.cat([ang, ang], dim=-1)  # (T, D)
    return ang.cos(), ang.sin()


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder (OPT, Llama, Mistral, Qwen2, Gemma3, ...), in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj") and hasattr(m, "layer_idx")]
    if not mods:
        raise UserError(f"no attention layers with k_proj/v_proj/layer_idx found in {type(model).__name__}")
    return sorted(mods, key=lambda m: m.layer_idx)
