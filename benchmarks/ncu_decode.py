"""Where a decode kernel's warps wait, from the GPU's counters: Nsight Compute over one launch per case.

``python benchmarks/ncu_decode.py [--cases llama3-8b:4:8:32768 ...]`` runs ``ncu`` (Nsight Compute; clocks left
alone) on the decode path the tuning table picks for each ``shape:bits:batch:T`` case and writes its report to
``benchmarks/results/ncu/<gpu>-<shape>-<bits>bit-b<batch>-<T>.txt``: throughput against the GPU's peaks,
occupancy, issue slots and the stall reasons per issued instruction (``smsp__average_warps_issue_stalled_*``).
With ``--launch`` it is the program ncu runs: one packed cache and one decode launch of the case.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
RESULTS = Path(__file__).resolve().parent / "results" / "ncu"
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "SchedulerStats", "WarpStateStats", "MemoryWorkloadAnalysis")
STALLS = r"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"


def launch(case: str) -> None:
    import torch
    from decode_attention import SHAPES

    from kvbench.kernels import ops
    from kvbench.kernels import triton as tk

    shape, bits, batch, T = case.split(":")
    hq, hkv, d = SHAPES[shape]
    torch.manual_seed(0)
    k = torch.randn(int(batch), hkv, int(T), d, dtype=torch.float16, device="cuda")
    kv = ops.build_packed_kv(k, torch.randn_like(k), int(bits), int(bits), 128, d, n_sink=0, n_recent=128,
                             impl="triton")
    q = torch.randn(int(batch), hq, d, dtype=torch.float16, device="cuda")
    print(case, tk.choose(q, kv), flush=True)
    tk.decode_attention(q, kv)
    torch.cuda.synchronize()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["llama3-8b:4:8:32768", "llama3-8b:4:1:131072", "llama3-8b:2:8:32768",
                                                   "llama3-8b:3:8:32768", "llama2-7b:4:8:32768"])
    p.add_argument("--launch", help="(what ncu runs) one case")
    p.add_argument("--ncu", default="ncu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.launch:
        return launch(args.launch)
    import torch

    gpu = torch.cuda.get_device_name().replace(" ", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        shape, bits, batch, T = case.split(":")
        cmd = [args.ncu, "--clock-control", "none", "-k", "regex:_(tensor|cuda)_core_kernel|_split_k_kernel",
               "--launch-count", "1", *[x for s in SECTIONS for x in ("--section", s)], "--metrics", STALLS,
               sys.executable, __file__, "--launch", case]
        run = subprocess.run(cmd, capture_output=True, text=True)
        out = args.out / f"{gpu}-{shape}-{bits}bit-b{batch}-{T}.txt"
        out.write_text(f"$ {' '.join(cmd[:-4])} python benchmarks/ncu_decode.py --launch {case}\n{run.stdout}"
                       + (f"\nstderr:\n{run.stderr[-2000:]}" if run.returncode else ""))
        print(out, "rc", run.returncode, flush=True)


if __name__ == "__main__":
    main()
