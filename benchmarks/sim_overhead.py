"""Benchmark (not a test): wall time and peak memory of fp16 vs simulated-quantized perplexity.

``python benchmarks/sim_overhead.py [--seqlen 2048 --windows 4 --out benchmarks/results]`` runs each
configuration in a fresh subprocess (so peak RSS is its own), timing only the perplexity loop after
a warm-up window, and writes ``simulated_overhead.json`` and ``.md``. Goal (issue 3): simulated
quantization adds at most 30 % to the fp16 time. The overhead is computed on CPU time (process time),
which a shared, oversubscribed machine disturbs far less than wall time; both are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

CONFIGS = {
    "fp16": ["method=fp16"],
    "uniform int4 per-token": ["method=uniform", "kv.bits=4"],
    "uniform int2 per-channel keys": ["method=uniform", "kv.bits=2", "method.key_axis=channel"],
    "uniform int4 + sink 1 + recent 128": ["method=uniform", "kv.bits=4", "method.sink_tokens=1", "method.recent_window=128"],
}


def one(overrides: list[str], seqlen: int, windows: int) -> dict:
    import torch
    from kvbench.config import compose
    from kvbench.data import load_splits
    from kvbench.eval.ppl import perplexity, tokenize_prefix
    from kvbench.model import load_model
    from kvbench.cache import patched
    from kvbench.run import build_method

    cfg = compose(overrides)
    model, tok, info = load_model(cfg.model)
    ids = tokenize_prefix(tok, load_splits(cfg.data).eval, seqlen * (windows + 1))
    method = build_method(cfg, info)
    with patched(model, method):
        perplexity(model, ids, seqlen, 1, progress=False)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        p = perplexity(model, ids, seqlen, windows, progress=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ppl": p["ppl"], "seconds": dt, "cpu_seconds": cpu, "tokens": p["tokens"], "peak_rss_mb": peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--one", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.seqlen, args.windows)))
        return
    rows = []
    for name, overrides in CONFIGS.items():
        cmd = [sys.executable, __file__, "--seqlen", str(args.seqlen), "--windows", str(args.windows), "--one", *overrides]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append({"config": name, "overrides": overrides, **json.loads(out)})
        print(f"{name:36s} {rows[-1]['cpu_seconds']:7.1f} CPU-s  {rows[-1]['peak_rss_mb']:7.0f} MB  ppl {rows[-1]['ppl']:.3f}", flush=True)
    base = rows[0]["cpu_seconds"]
    for r in rows:
        r["overhead_vs_fp16"] = r["cpu_seconds"] / base - 1
    meta = {"command": f"python benchmarks/sim_overhead.py --seqlen {args.seqlen} --windows {args.windows}",
            "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
            "model": "smollm2-135m (fp32, CPU)", "seqlen": args.seqlen, "windows": args.windows,
            "load_average": __import__("os").getloadavg()[0]}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "simulated_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['model']}", "",
             "| config | CPU time (s) | wall time (s) | overhead vs fp16 (CPU) | peak RSS (MB) | ppl |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['cpu_seconds']:.1f} | {r['seconds']:.1f} | {r['overhead_vs_fp16']:+.1%} | {r['peak_rss_mb']:.0f} | {r['ppl']:.3f} |"
              for r in rows]
    (out_dir / "simulated_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
