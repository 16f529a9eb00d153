"""Packed low-bit KV cache: Triton kernels, their PyTorch reference twins, and a transformers Cache.

Storage layout (one int32 row of words per token and head):

* A ``bits``-wide code is split into power-of-two slices, widest first, low bits first
  (``3 = 2 + 1``: bits 0-1 in a 2-bit slice, bit 2 in a 1-bit slice; ``4``: one 4-bit slice).
* A ``w``-bit slice of ``D`` codes takes ``D * w / 32`` words; word ``i`` holds channels
  ``i * (32/w) .. i * (32/w) + 32/w - 1``, channel ``i * (32/w) + j`` at bits ``j*w .. j*w + w - 1``
  (little-endian within the word). Slices follow each other in the row, so a token costs exactly
  ``bits * D / 32`` words (no padding for 3 bits).
* Keys: one fp16 ``(scale, zero)`` per channel per block of ``key_block`` tokens (or calibrated,
  given per channel). Values: one fp16 ``(scale, zero)`` per token per group of ``value_group``
  channels. ``x_hat = scale * level + zero``, ``level = code`` (uniform) or ``lut[h, d, code]``
  (NUQ, codebook in the code domain: see :func:`~kvbench.kernels.ops.codebook_from_unit`).
* Codes: ``clamp(floor((x - zero) / scale + 0.5), 0, 2**bits - 1)`` with the fp16-rounded
  scale/zero (the nearest centroid for NUQ; the first one on ties).
* Key outliers (dense-and-sparse): the dense part quantizes ``x`` clamped to per-channel thresholds;
  the sparse part stores the residual ``x - x_hat`` at the clamped positions as CSR per key block.
  Per-token keys (``key_axis="token"``) and values may have per-token outliers (KVQuant: each token's
  extremes over all heads), in the same CSR layout (``ol_*`` keys, ``vol_*`` values).
* Keys per token (``key_axis="token"``): one ``(scale, zero)`` per token per group of channels, as values.
* Channel ``(scale, shift)`` (``k_chan``/``v_chan``): codes of ``(x - shift) / scale``; keys are mapped back
  in the decode tile (before RoPE), values in the output.
* Mixed widths: a list of :class:`~kvbench.kernels.ops.PackedKV`, one store per ``(key bits, value bits)``,
  each with every token's ``positions`` (``-1``: an empty slot); :mod:`.records` names each format.

Modules: :mod:`.reference` (PyTorch), :mod:`.triton` (Triton, one module per kernel), :mod:`.ops`
(dispatch), :mod:`.tuning` (decode path and launch tuning per GPU, data in ``tuning.json``), :mod:`.cache`
(the transformers ``Cache``). Formats, paths and benchmarks: ``docs/kernels.md``.
"""

from .ops import (
    BACKEND_ERROR,
    PackedKV,
    codebook_from_unit,
    decode_attention,
    fused_simulated,
    pack_codes,
    quantize_pack_keys,
    quantize_pack_values,
    require_triton,
    split_outliers,
    triton_available,
    unpack_codes,
)

__all__ = [
    "BACKEND_ERROR",
    "PackedKV",
    "codebook_from_unit",
    "decode_attention",
    "fused_simulated",
    "pack_codes",
    "quantize_pack_keys",
    "quantize_pack_values",
    "require_triton",
    "split_outliers",
    "triton_available",
    "unpack_codes",
]
