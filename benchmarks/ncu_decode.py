"""Where a decode kernel's warps wait, from the GPU's counters: Nsight Compute over one launch per case.

``python benchmarks/ncu_decode.py [--cases llama3-8b:4:8:32768 ...]`` runs ``ncu`` (Nsight Compute; clocks left
alone) on the decode path the tuning table picks for each ``shape:bits:batch:T`` case and writes its report to
``benchmarks/results/ncu/<gpu>-<shape>-<bits>bit-b<batch>-<T>.txt``: throughput against the GPU's peaks,
occupancy, issue slots and the stall reasons per issued instruction (``smsp__average_warps_issue_stalled_*``).
With ``--launch`` it is the program ncu runs: one packed cache and one decode launch of the case.

``--source`` samples where the warps stall per machine instruction instead (the SourceCounters section) and
writes ``...-source.txt``: the stall samples by reason, and the instructions with the most samples, each with
the instructions before it (what it waits on).
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import sys
import tempfile
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


def source_summary(table: str, top: int = 12, before: int = 6) -> str:
    """``ncu --page source --print-source sass --csv`` output as text: total stall samples by reason, then the
    ``top`` instructions by samples, each after the ``before`` instructions that precede it."""
    lines = list(csv.reader(io.StringIO(table)))
    start = next(i for i, r in enumerate(lines) if r[:2] == ["Address", "Source"])
    head, rows = lines[start], [r for r in lines[start + 1:] if len(r) == len(lines[start])]
    col = {h: i for i, h in enumerate(head)}
    num = lambda r, h: float(r[col[h]]) if r[col[h]] not in ("", "-") else 0.0  # noqa: E731
    samples = "Warp Stall Sampling (All Samples)"
    reasons = [h for h in head if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(num(r, samples) for r in rows)
    by_reason = {h: sum(num(r, h) for r in rows) for h in reasons}
    out = [f"stall samples: {total:.0f} over {len(rows)} instructions"]
    for h, n in sorted(by_reason.items(), key=lambda x: -x[1]):
        if n:
            out.append(f"  {h[6:]:<18} {n:6.0f}  {n / total:6.1%}")
    for i in sorted(range(len(rows)), key=lambda i: -num(rows[i], samples))[:top]:
        r, n = rows[i], num(rows[i], samples)
        why = ", ".join(f"{h[6:]} {num(r, h):.0f}" for h in reasons if num(r, h) >= 0.1 * n)
        out.append(f"\n{n:.0f} samples ({n / total:.1%}; {why}) at {r[col['Source']].strip()}")
        out += [f"    {x[col['Source']].strip()}" for x in rows[max(0, i - before):i]]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", type=case, default=[case(c) for c in (
        "llama3-8b:4:8:32768", "llama3-8b:4:1:131072", "llama3-8b:2:8:32768", "llama3-8b:3:8:32768",
        "llama2-7b:4:8:32768")])
    p.add_argument("--launch", type=case, help="(what ncu runs) one case")
    p.add_argument("--ncu", default="ncu")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--source", action="store_true", help="stall samples per machine instruction (-source.txt)")
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
        sections = ("SourceCounters", "WarpStateStats") if args.source else SECTIONS
        with tempfile.TemporaryDirectory() as tmp:  # --source: ncu's report, read back per instruction
            rep = Path(tmp) / "source"
            cmd = [args.ncu, "--clock-control", "none", "-k", "regex:_(tensor|cuda)_core_kernel|_split_k_kernel",
                   "--launch-count", "1", *[x for s in sections for x in ("--section", s)],
                   *(["--import-source", "no", "-o", str(rep)] if args.source else ["--metrics", STALLS]),
                   sys.executable, __file__, "--launch", name]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if args.source and not run.returncode:
                page = [args.ncu, "-i", f"{rep}.ncu-rep", "--page", "source", "--print-source", "sass", "--csv"]
                run = subprocess.run(page, capture_output=True, text=True)
                cmd = [*cmd, "&&", *page]
        if run.returncode:  # no report replaces the one kept
            failed.append(name)
            print(f"{name}: ncu exited {run.returncode}:\n{run.stderr[-2000:]}", flush=True)
            continue
        out = args.out / f"{gpu}-{shape}-{bits}bit-b{batch}-{T}{'-source' if args.source else ''}.txt"
        text = source_summary(run.stdout) if args.source else run.stdout
        out.write_text(f"$ {' '.join(cmd)}\n{text}".replace(f"{sys.executable} {__file__}",
                                                           "python benchmarks/ncu_decode.py"))
        print(out, flush=True)
    if failed:
        raise SystemExit(f"ncu failed for {failed}: their reports were not written")


if __name__ == "__main__":
    main()
