"""Cost columns a spec can use, derived from each run's record and the checked-in decode benchmark.

Added to the results frame before a table is built (all under ``metrics.``, so they never make runs look
like different experiments):

* ``metrics.kv_bytes_per_token`` of fp16 runs: ``4 * layers * kv_heads * head_dim`` (K and V at two bytes,
  the size of the fp16 cache by construction); packed runs measure theirs (``kv.backend=kernel``);
* ``metrics.kv_bytes_saving``: ``1 - bytes / fp16 bytes`` of the run's model;
* ``metrics.decode_speedup.<shape>.<T>``: the benchmark's decode speedup against the faster fp16 SDPA
  backend (``speedup_vs_best_fp16``) for the run's packed format (``metrics.kv_format``) and ``kv.bits`` at
  that shape (``llama3-8b``, ``llama2-7b``), context and batch 1; 1 for fp16 runs; empty where the
  benchmark has no record of the format yet (a spec column gives such cells their own words,
  ``missing:``).
"""

from __future__ import annotations

import math

from kvbench.kernels.records import PLAIN, load_records

CONTEXTS = (32768,)


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def add_cost_columns(frame, records: list[dict] | None = None):
    """``frame`` with the cost columns of the module docstring (a copy; an empty frame is returned as is)."""
    if frame.empty:
        return frame
    records = load_records() if records is None else records
    frame = frame.copy()
    col = lambda name: frame[name] if name in frame.columns else [None] * len(frame)  # noqa: E731
    fp16 = [4 * l * h * d if None not in (l, h, d) else None
            for l, h, d in zip(*(map(_num, col(f"metrics.model.{k}")) for k in ("layers", "kv_heads", "head_dim")))]
    is_fp16 = [m == "fp16" for m in col("method.name")]
    measured = [_num(b) for b in col("metrics.kv_bytes_per_token")]
    nbytes = [f if ref else b for f, b, ref in zip(fp16, measured, is_fp16)]
    frame["metrics.kv_bytes_per_token"] = nbytes
    frame["metrics.kv_bytes_saving"] = [1 - b / f if b is not None and f else None for b, f in zip(nbytes, fp16)]
    for shape in sorted({r["shape"] for r in records}):
        for T in CONTEXTS:
            values = []
            for ref, fmt, bits in zip(is_fp16, col("metrics.kv_format"), col("kv.bits")):
                rec = None if ref or not isinstance(fmt, str) else next(
                    (r for r in records if r["shape"] == shape and r["T"] == T and r["batch"] == 1
                     and r.get("format", PLAIN) == fmt and r["bits"] == _num(bits)), None)
                values.append(1.0 if ref else None if rec is None else rec["speedup_vs_best_fp16"])
            frame[f"metrics.decode_speedup.{shape}.{T // 1024}k"] = values
    return frame
