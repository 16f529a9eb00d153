"""The cost of a packed cache: its format as a name, the checked-in decode benchmark looked up by that name,
and decode attention timed on a GPU.

A format name lists what the decode kernel reads, e.g. ``k-channel`` (uniform codes, keys per channel in
key blocks, values per token: the benchmark's default format, also of records without a ``format`` field) or
``k-channel+nuq+pre-rope+k-outliers+v-outliers`` (KVQuant) or ``k-token+pre-rope+channel-affine+mixed-4:3/4:4/4:5``
(QoKV at 4 bits). The run (``metrics.json``: ``kv_format``) and ``benchmarks/decode_attention.py --formats``
name formats with the same function, so a run finds the benchmark rows of its own format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import ops

RECORDS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "decode_attention.json"
PLAIN = "k-channel"


def format_name(kv) -> str:
    """Name of the packed format of a :class:`~kvbench.kernels.ops.PackedKV` (or a mixed-width list)."""
    parts = list(kv) if isinstance(kv, (list, tuple)) else [kv]
    p = parts[0]
    tags = ["k-token" if p.key_axis == "token" else "k-channel"]
    tags += [t for t, on in (("nuq", p.k_lut is not None or p.v_lut is not None), ("pre-rope", p.inv_freq is not None),
                             ("k-outliers", p.ol_ptr is not None), ("v-outliers", p.vol_ptr is not None),
                             ("channel-affine", p.k_chan is not None or p.v_chan is not None)) if on]
    if len(parts) > 1:
        tags.append("mixed-" + "/".join(f"{q.key_bits}:{q.value_bits}" for q in parts))
    return "+".join(tags)


def load_records(path: Path = RECORDS) -> list[dict]:
    """The benchmark records (``[]`` where the file is absent, e.g. an installed package)."""
    try:
        return json.loads(Path(path).read_text())
    except OSError:
        return []


def lookup(records: list[dict], fmt: str, bits: int, h_q: int, h_kv: int, head_dim: int, T: int,
           batch: int = 1, gpu: str | None = None) -> dict | None:
    """The first record of format ``fmt`` at this shape, base width, context and batch (on ``gpu``, a
    substring of the record's GPU name, if given), or None."""
    for r in records:
        if (r.get("format", PLAIN) == fmt and r["bits"] == bits and (r["h_q"], r["h_kv"], r["head_dim"]) == (h_q, h_kv, head_dim)
                and r["T"] == T and r["batch"] == batch and (gpu is None or gpu in r["gpu"])):
            return r
    return None


def measure_decode_us(kvs: list, h_q: int, impl: str = "auto", path: str = "auto", reps: int = 20) -> float:
    """Median CUDA time (µs) of one decode step's attention over every layer's packed cache ``kvs`` (a query
    ``(B, h_q, D)`` per layer, in the caches' dtype)."""
    first = kvs[0][0] if isinstance(kvs[0], (list, tuple)) else kvs[0]
    B, _, _, D = first.sink_k.shape
    q = torch.randn(B, h_q, D, dtype=first.sink_k.dtype, device=first.sink_k.device)

    def step():
        for kv in kvs:
            ops.decode_attention(q, kv, impl=impl, path=path)

    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def decode_cost(kvs: list, h_q: int, bits: int, context: int, impl: str = "auto", path: str = "auto",
                records: list[dict] | None = None) -> dict:
    """``decode_us_per_token`` (attention of every layer for one new token at ``context``) and its source:
    measured on a CUDA device, else the checked-in benchmark's record of the same format, shape, base width
    and context (per layer, times the layers), else None with the reason.

    Args:
        kvs: each layer's packed cache (``PackedLayer.packed_kv()``).
        h_q: query heads.
        bits: the run's base width (``kv.bits``).
        context: tokens in the cache (the run's context).
    """
    first = kvs[0][0] if isinstance(kvs[0], (list, tuple)) else kvs[0]
    fmt = format_name(kvs[0])
    device = first.sink_k.device
    if device.type == "cuda":
        us = measure_decode_us(kvs, h_q, impl, path)
        name = torch.cuda.get_device_name(device)
        return {"decode_us_per_token": us, "decode_us_source": f"measured on {name}: attention of {len(kvs)} layers "
                f"at context {context}, batch {first.sink_k.shape[0]}"}
    h_kv, D = first.k_words.shape[1], first.sink_k.shape[-1]
    rec = lookup(load_records() if records is None else records, fmt, bits, h_q, h_kv, D, context)
    if rec is None:
        return {"decode_us_per_token": None, "decode_us_source": f"none: not on a GPU, and {RECORDS.name} has no "
                f"record of format {fmt} at {h_q}/{h_kv} heads, head_dim {D}, {bits} bits, T {context}"}
    return {"decode_us_per_token": rec["kernel_us"] * len(kvs),
            "decode_us_source": f"{RECORDS.name} ({rec['gpu']}): {rec['kernel_us']} us per layer x {len(kvs)} layers"}
