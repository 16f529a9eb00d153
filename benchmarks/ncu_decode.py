"""Where a decode kernel's warps wait, from the GPU's counters: Nsight Compute over one launch per case.

``python benchmarks/ncu_decode.py [--cases llama3-8b:4:8:32768 ...]`` runs ``ncu`` (Nsight Compute; clocks left
alone) on the decode path the tuning table picks for each ``shape:bits:batch:T`` case and writes its report to
``benchmarks/results/ncu/<gpu>-<shape>-<bits>bit-b<batch>-<T>.txt``: throughput against the GPU's peaks,
occupancy, issue slots and the stall reasons per issued instruction (``smsp__average_warps_issue_stalled_*``).
With ``--launch`` it is the program ncu runs: one packed cache and one decode launch of the case.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from decode_attention import SHAPES, plain_cache  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ncu"
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "SchedulerStats", "WarpStateStats", "MemoryWorkloadAnalysis")
STALLS = r"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"


def case(text: str) -> tuple[str, int, int, int]:
    """``shape:bits:batch:T`` as ``(shape, bits, batch, T)`` (argparse's type: a bad case is one line)."""
    parts = text.split(":")
    if len(parts) != 4 or parts[0] not in SHAPES or not all(x.isdigit() for x in parts[1:]):
        raise argparse.ArgumentTypeError(f"{text!r} is not shape:bits:batch:T with shape one of {sorted(SHAPES)}")
    return parts[0], *map(int, parts[1:])


def launch(shape: str, bits: int, batch: int, T: int) -> None:
    import torch

    from kvbench.kernels import triton as tk

    hq, hkv, d = SHAPES[shape]
    torch.manual_seed(0)
    k = torch.randn(batch, hkv, T, d, dtype=torch.float16, device="cuda")
    kv = plain_cache(k, torch.randn_like(k), bits)
    q = torch.randn(batch, hq, d, dtype=torch.float16, device="cuda")
    print(shape, bits, batch, T, tk.choose(q, kv), flush=True)
    tk.decode_attention(q, kv)
    torch.cuda.synchronize()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", type=case, default=[case(c) for c in (
        "llama3-8b:4:8:32768", "llama3-8b:4:1:131072", "llama3-8b:2:8:32768", "llama3-8b:3:8:32768",
        "llama2-7b:4:8:32768")])
    p.add_argument("--launch", type=case, help="(what ncu runs) one case")
    p.add_argument("--ncu", default="ncu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.launch:
        return launch(*args.launch)
    import torch

    if not torch.cuda.is_available() or shutil.which(args.ncu) is None:
        raise SystemExit(f"benchmarks/ncu_decode.py needs a CUDA GPU and Nsight Compute ({args.ncu!r} not found)"
                         if torch.cuda.is_available() else "benchmarks/ncu_decode.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for shape, bits, batch, T in args.cases:
        name = f"{shape}:{bits}:{batch}:{T}"
        cmd = [args.ncu, "--clock-control", "none", "-k", "regex:_(tensor|cuda)_core_kernel|_split_k_kernel",
               "--launch-count", "1", *[x for s in SECTIONS for x in ("--section", s)], "--metrics", STALLS,
               sys.executable, __file__, "--launch", name]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:  # no report replaces the one kept
            failed.append(name)
            print(f"{name}: ncu exited {run.returncode}:\n{run.stderr[-2000:]}", flush=True)
            continue
        out = args.out / f"{gpu}-{shape}-{bits}bit-b{batch}-{T}.txt"
        out.write_text(f"$ {' '.join(cmd[:-4])} python benchmarks/ncu_decode.py --launch {name}\n{run.stdout}")
        print(out, flush=True)
    if failed:
        raise SystemExit(f"ncu failed for {failed}: their reports were not written")


if __name__ == "__main__":
    main()
