"""Decode attention over a packed cache: the registry of decode paths and the one dispatcher.

A path is a module with ``applies(kv, G) -> bool`` and ``launch(q, kv, sm_scale, **tuning) -> SplitPlan``
(its kernel writes one partial output per split; :func:`~.common.reduce_splits` combines them). To add
one: a module beside these, one entry in :data:`PATHS`, its rules in ``kvbench/kernels/tuning.json``, and
its reference-twin test in ``tests/test_kernels_fast.py``.
"""

from __future__ import annotations

import functools
import inspect

import torch

from kvbench.registry import plugins, register, unknown_name_error

from .. import tuning as tuning_table
from . import cuda_core, split_k, tensor_core
from .common import reduce_splits

for _name, _module in (("split_k", split_k), ("cuda_core", cuda_core), ("tensor_core", tensor_core)):
    register("kernel path", _name)(_module)
PATHS = plugins("kernel path", load=False)
KNOBS = ("tile", "num_warps", "num_stages", "waves", "maxnreg", "min_rows", "m_axis", "ol_chunk", "vec", "fields",
         "inline_table", "tma", "qk_regs", "n_splits")  # the launch parameters a rule or an override may give


@functools.cache
def _launch_keys(path: str) -> frozenset:
    """The tuning keys ``path``'s launch takes (read once: ``choose`` runs in every eager decode call)."""
    return frozenset(inspect.signature(PATHS[path].launch).parameters)


def choose(q: torch.Tensor, kv, path: str = "auto", **overrides) -> dict:
    """The decode path and launch tuning for ``q (B, H_q, D)`` over ``kv`` (a layer's
    :class:`~kvbench.kernels.ops.PackedKV`, or a mixed-width cache's list of them): ``{"path": ..., **tuning}``.

    ``path="auto"`` takes the first rule of the tuning table (for this GPU and shape) whose path applies;
    a named path must apply (formats that are not :attr:`~kvbench.kernels.ops.PackedKV.plain`, and mixed-width
    lists, go to ``split_k``). ``overrides`` replace the table's launch parameters."""
    if path != "auto" and path not in PATHS:
        raise unknown_name_error("kernel path", path, ["auto", *PATHS])
    if isinstance(kv, (list, tuple)):  # a mixed-width cache: one split_k launch per store, of its first's tuning
        launch = choose(q, kv[0], "split_k" if path == "auto" else path, **overrides)
        if launch["path"] != "split_k":
            raise ValueError(f"a mixed-width cache is read by the split_k path, not {launch['path']!r}")
        return launch
    unknown = set(overrides) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)}; known: {sorted(KNOBS)}")
    B, Hq, D = q.shape
    G = Hq // kv.k_words.shape[1]
    gpu = tuning_table.gpu_name(q.device)
    for rule in tuning_table.rules(gpu, G, kv.key_bits, kv.value_bits, D, path, B):
        if (kv.plain or rule["path"] == "split_k") and PATHS[rule["path"]].applies(kv, G):
            rule = {**rule, **overrides}
            rule["tile"] = min(rule["tile"], kv.key_block)  # a tile reads one key block's scales
            foreign = set(rule) - {"path"} - _launch_keys(rule["path"])
            if foreign:
                raise ValueError(f"the {rule['path']} path takes no tuning keys {sorted(foreign)}")
            return {**rule, "gpu": gpu, "measured_on": tuning_table.measured_on(gpu)}
    raise ValueError(f"decode path {path!r} does not apply to this packed format (G={G}, {kv.key_bits}/"
                     f"{kv.value_bits} bits, codebooks/pre-RoPE/outliers/grouped values)")


def decode_attention(q: torch.Tensor, kv, sm_scale: float | None = None, *, path: str = "auto", **tuning):
    """Triton twin of :func:`kvbench.kernels.reference.decode_attention` (split-K, then one reduction).

    Args:
        q: ``(B, H_q, D)``.
        kv: the layer's :class:`~kvbench.kernels.ops.PackedKV`, or a mixed-width list of them (``split_k``).
        sm_scale: softmax scale (default ``D ** -0.5``).
        path: ``"auto"`` (the tuning table) or one of :data:`PATHS`.
        **tuning: launch parameters replacing the table's (``tile``, ``num_warps``, ``num_stages``,
            ``waves``, ``n_splits``; ``cuda_core`` also ``vec``, ``fields``; ``tensor_core`` also ``maxnreg``,
            ``min_rows``, ``m_axis``, ``inline_table``, ``tma``; ``split_k`` also ``ol_chunk``).

    Returns:
        ``(B, H_q, D)`` in ``q.dtype``.
    """
    q = q.contiguous()
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    launch = choose(q, kv, path, **tuning)
    knobs = {k: v for k, v in launch.items() if k in KNOBS}
    if isinstance(kv, (list, tuple)):  # a mixed-width cache: one split_k launch per store, one reduction
        return reduce_splits(q, split_k.launch_parts(q, kv, scale, **knobs))
    return reduce_splits(q, PATHS[launch["path"]].launch(q, kv, scale, **knobs))
