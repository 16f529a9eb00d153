"""How much the golden perplexities move with the CPU kernel level (cross-machine drift).

The same fp32 model gives slightly different logits on machines with different vector units:
PyTorch dispatches its own kernels by ``ATEN_CPU_CAPABILITY``, the BLAS (MKL) and oneDNN pick
theirs by ISA. A quantized cache turns a 1e-6 change of a key into a different rounding of a
few elements, so quantized perplexities drift far more than fp16 ones. This script runs the
golden settings of ``tests/golden/make_ppl.py``, ``make_kvquant.py`` and ``make_qokv.py`` once per
level (one subprocess each: the variables are read when the libraries load) and writes

* ``benchmarks/results/cpu_drift.json``: per row (golden, method, bits) the perplexity at every
  level and the largest relative deviation from the median over levels; the CPU, torch version and
  thread count;
* ``benchmarks/results/cpu_drift.md``: the same as a table, rendered from the JSON.

Run from the repo root::

    python benchmarks/cpu_drift.py                 # every level (1-10 minutes each on 2 shared cores)
    python benchmarks/cpu_drift.py --levels native aten_default
    python benchmarks/cpu_drift.py --render        # only rebuild the .md from the .json

The golden tests allow twice each row's ``spread`` (max / min - 1 over the levels and the machine that
wrote tests/golden; tests/reference.py: ``drift_tolerance``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"

# name -> environment; "avx2_machine" caps every library at AVX2 together, as an AVX2-only CPU would
LEVELS = {
    "native": {},
    "aten_default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten_avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten_avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "onednn_avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "onednn_sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "mkl_avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx2_machine": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
GOLDEN_LEVEL = "golden_machine"  # the checked-in value of tests/golden/*.json: another machine's native level
CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def worker() -> dict:
    """Every golden row at this process's kernel level: ``{row: {"golden", "method", "bits", "ppl"}}``."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "golden"))
    import torch
    from omegaconf import OmegaConf

    import make_kvquant
    import make_ppl
    import make_qokv
    from conftest import _load
    from kvbench.config import DataConfig
    from kvbench.data import load_splits

    model, tok, info = _load("smollm2-135m")
    splits = load_splits(OmegaConf.structured(DataConfig(name="wiki")))
    rows = {}
    for name, ppl in make_ppl.measure(model, tok, info, splits).items():
        bits = 16 if name == "fp16" else int(name[3:])
        rows[f"ppl/{name}"] = {"golden": "ppl.json", "method": "fp16" if bits == 16 else "uniform per-token",
                               "bits": bits, "ppl": ppl}
    for name, r in make_kvquant.small((model, tok, info), splits).items():
        spec = make_kvquant.SMALL_ROWS[name]
        method = "fp16" if spec is None else ("kvquant " + name.split("_")[0] if "nuq" in name else "kvquant per-token")
        rows[f"kvquant/{name}"] = {"golden": "kvquant.json", "method": method, "bits": 16 if spec is None else spec[0],
                                   "ppl": r["ppl"]}
    for name, r in make_qokv.measure(model, tok, info, splits).items():
        method = {"fp16": "fp16", "uniform4": "uniform per-token", "qokv4": "qokv"}[name]
        rows[f"qokv/{name}"] = {"golden": "qokv.json", "method": method, "bits": 16 if name == "fp16" else 4,
                                "ppl": r["ppl"]}
    return {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "rows": rows}


def run_level(name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CAP_VARS}
    env.update(LEVELS[name])
    env.setdefault("TQDM_DISABLE", "1")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--worker"], env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"level {name} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["env"] = LEVELS[name]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def golden_values() -> dict:
    """The checked-in goldens, ``{row: ppl}``: what the machine that wrote ``tests/golden`` measured."""
    g = ROOT / "tests" / "golden"
    out = {f"ppl/{k}": v for k, v in json.loads((g / "ppl.json").read_text())["ppl"].items()}
    out |= {f"kvquant/{k}": v["ppl"] for k, v in json.loads((g / "kvquant.json").read_text())["rows"].items()}
    out |= {f"qokv/{k}": v["ppl"] for k, v in json.loads((g / "qokv.json").read_text())["runs"].items()}
    return out


def summarize(levels: dict) -> dict:
    """Per row: perplexity per level (and the golden machine's), the median over them all and the
    largest relative deviation from it."""
    rows = {}
    golden = golden_values()
    for row, meta in next(iter(levels.values()))["rows"].items():
        ppl = {lv: r["rows"][row]["ppl"] for lv, r in levels.items()} | {GOLDEN_LEVEL: golden[row]}
        med = statistics.median(ppl.values())
        dev = {lv: abs(p / med - 1) for lv, p in ppl.items()}
        rows[row] = {**{k: meta[k] for k in ("golden", "method", "bits")}, "ppl": ppl, "median": med,
                     "rel_dev": dev, "max_rel_dev": max(dev.values()),
                     "spread": max(ppl.values()) / min(ppl.values()) - 1}
    return rows


def write(levels: dict, path: Path) -> dict:
    """``cpu_drift.json`` from the per-level results (each row's perplexities kept once, in ``rows``)."""
    first = next(iter(levels.values()))
    data = {"script": "benchmarks/cpu_drift.py", "cpu": cpu_model(), "torch": first["torch"],
            "threads": first["threads"],
            "levels": {**{lv: {k: v for k, v in r.items() if k != "rows"} for lv, r in levels.items()},
                       GOLDEN_LEVEL: {"env": {}, "capability": "unknown (the checked-in tests/golden/*.json)"}},
            "rows": summarize(levels)}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def read_levels(path: Path) -> dict:
    """The per-level results back from ``cpu_drift.json`` (for ``--keep``)."""
    data = json.loads(path.read_text())
    return {lv: {**info, "torch": data["torch"], "rows": {row: {**{k: r[k] for k in ("golden", "method", "bits")},
                                                               "ppl": r["ppl"][lv]} for row, r in data["rows"].items()}}
            for lv, info in data["levels"].items() if lv != GOLDEN_LEVEL}


def render(data: dict) -> str:
    """The Markdown table of ``cpu_drift.json`` (perplexity per level, max relative deviation)."""
    names = list(data["levels"])
    lines = [
        "# Cross-machine drift of the golden perplexities",
        "",
        f"Generated by `python benchmarks/cpu_drift.py` from `cpu_drift.json`; do not edit. CPU: {data['cpu']}, "
        f"torch {data['torch']}, {data['threads']} threads. Levels:",
        "",
    ]
    for lv in names:
        env = " ".join(f"`{k}={v}`" for k, v in data["levels"][lv]["env"].items()) or "(no variable)"
        lines.append(f"- **{lv}**: {env} -> ATen dispatch `{data['levels'][lv]['capability']}`")
    lines += ["", "| golden | row | method | bits | " + " | ".join(names) + " | max rel. dev. | spread |",
              "|---|---|---|---|" + "---|" * len(names) + "---|---|"]
    for row, r in data["rows"].items():
        cells = " | ".join(f"{r['ppl'][lv]:.4f}" for lv in names)
        lines.append(f"| {r['golden']} | {row.split('/')[1]} | {r['method']} | {r['bits']} | {cells} | "
                     f"{100 * r['max_rel_dev']:.3f} % | {100 * r['spread']:.3f} % |")
    lines += ["", "max rel. dev.: largest |ppl / median - 1| of the row, the median taken over every column; "
              "spread: max / min - 1 over every column. "
              f"`{GOLDEN_LEVEL}` is the checked-in golden, measured on the machine that wrote tests/golden. "
              "The golden tests allow twice the spread (tests/reference.py: `drift_tolerance`).", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", nargs="+", choices=list(LEVELS), default=list(LEVELS))
    ap.add_argument("--keep", action="store_true", help="keep the levels already in cpu_drift.json, add the others")
    ap.add_argument("--render", action="store_true", help="only rebuild cpu_drift.md from cpu_drift.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker()))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "cpu_drift.json"
    if not args.render:
        levels = read_levels(path) if args.keep and path.exists() else {}
        for name in args.levels:
            if name in levels:
                continue
            levels[name] = run_level(name)
            print(f"{name}: {levels[name]['capability']} {levels[name]['wall_s']} s", file=sys.stderr)
            write(levels, path)  # after every level: a long measurement can be stopped and resumed (--keep)
    data = json.loads(path.read_text())
    (OUT / "cpu_drift.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
