"""Calibration-time benchmark: ``python benchmarks/calibration.py [overrides ...]``.

Times KVQuant's calibration of a model exactly as a run does it (statistics with the Fisher
information, then the per-channel thresholds and Fisher-weighted k-means codebooks), without the
artifact cache, and writes the timings with the machine's description to
``benchmarks/results/calibration.json`` (``--out``). Extra arguments are Hydra overrides, e.g.
``python benchmarks/calibration.py kv.bits=3 calib.num_samples=16 calib.seqlen=512``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "calibration.json"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1: CPU time is then the work itself, an upper bound of the wall "
                         "time on 2 dedicated cores, robust to other jobs sharing the machine)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default: method=kvquant)")
    args = ap.parse_args(argv)
    prev_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _bench(args)
    finally:
        torch.set_num_threads(prev_threads)


def _bench(args) -> dict:
    from kvbench.calibration import calibration_batches, collect, without_sink
    from kvbench.config import compose
    from kvbench.data import load_splits
    from kvbench.model import load_model
    from kvbench.run import build_method, pick_device

    cfg = compose(["method=kvquant", *args.overrides])
    t0 = time.perf_counter()
    model, tok, info = load_model(cfg.model, pick_device(cfg))
    method = build_method(cfg, info)
    splits = load_splits(cfg.data)
    needs = set(method.calibration_needs())
    if not cfg.calib.fisher:
        needs.discard("fisher")
    batches = calibration_batches(tok, splits.joined("calib"), cfg.calib.num_samples, cfg.calib.seqlen, cfg.seed)
    t1, c1 = time.perf_counter(), time.process_time()
    stats = collect(model, batches, frozenset(needs), cfg.logging.progress)
    t2, c2 = time.perf_counter(), time.process_time()
    tensors = method.calibrate(without_sink(stats, method.cfg.sink_tokens))
    t3, c3 = time.perf_counter(), time.process_time()
    result = {
        "what": "KVQuant calibration (statistics incl. Fisher + per-channel thresholds + k-means codebooks)",
        "command": " ".join(["python benchmarks/calibration.py", *([f"--threads {args.threads}"] if args.threads else []),
                             *args.overrides]),
        "model": cfg.model.name,
        "method": {k: v for k, v in dict(cfg.method).items()},
        "bits": cfg.kv.bits,
        "calib": {"num_samples": cfg.calib.num_samples, "seqlen": cfg.calib.seqlen, "fisher": cfg.calib.fisher},
        "needs": sorted(needs),
        "time_s": {"load": t1 - t0, "statistics": t2 - t1, "fit": t3 - t2, "calibration_total": t3 - t1},
        # CPU seconds of this process (all threads); with --threads 1 robust to other jobs sharing
        # the cores (no spinning threads), and an upper bound of the wall time on 2 dedicated cores
        "cpu_s": {"statistics": c2 - c1, "fit": c3 - c2, "calibration_total": c3 - c1},
        "artifact_tensors": len(tensors),
        "artifact_mb": sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_avg_1m_at_end": os.getloadavg()[0], "platform": platform.platform(),
                    "torch": torch.__version__, "device": str(next(model.parameters()).device)},
        "budget_s": 300,
    }
    result["within_budget_wall"] = result["time_s"]["calibration_total"] < result["budget_s"]
    result["within_budget_cpu"] = result["cpu_s"]["calibration_total"] < result["budget_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    ts = result["time_s"]
    print(f"kvbench | calibration of {cfg.model.name} on {cfg.calib.num_samples} x {cfg.calib.seqlen} tokens "
          f"(fisher={cfg.calib.fisher}): statistics {ts['statistics']:.1f} s + fit {ts['fit']:.1f} s = "
          f"{ts['calibration_total']:.1f} s wall, {result['cpu_s']['calibration_total']:.1f} CPU-s "
          f"(budget 300 s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores) -> {out}")
    return result


if __name__ == "__main__":
    main()
