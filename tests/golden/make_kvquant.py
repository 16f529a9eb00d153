"""Golden numbers of KVQuant on the embedded SmolLM2-135M (CPU, fp32, deterministic).

Two files, both checked by tests/test_kvquant.py:

* ``python tests/golden/make_kvquant.py`` writes ``tests/golden/kvquant.json``: a small setting the
  test recomputes (calibration 4 x 512 tokens with Fisher, perplexity on 2 windows of 512 tokens
  of the embedded Wikipedia evaluation text): fp16, int3 per-token, nuq3-1%, nuq4-1%.
* ``python tests/golden/make_kvquant.py --ablation`` writes ``tests/golden/kvquant_ablation.json``
  from the results store: the run directories of every row of ``sweeps/kvquant_ablation.yaml``
  (run with ``python -m kvbench.sweep sweeps/kvquant_ablation.yaml output_dir=reports/runs
  logging.wandb.mode=disabled logging.progress=false``), located by composing each row's config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
SWEEP_EXTRA = ["output_dir=reports/runs", "logging.wandb.mode=disabled", "logging.progress=false"]
CALIB = dict(num_samples=4, seqlen=512, seed=0)
EVAL = dict(seqlen=512, max_windows=2)
SMALL_ROWS = {  # row -> (kv.bits, KVQuantConfig fields); None = fp16
    "fp16": None,
    "int3_token": (3, dict(key_axis="token", pre_rope=False, nuq=False, outlier_frac=0.0)),
    "nuq3_1pct": (3, dict()),
    "nuq4_1pct": (4, dict()),
}


def small(embedded_model, splits, states: dict | None = None) -> dict:
    """Perplexity and average bits of :data:`SMALL_ROWS` in the small setting (``states``, if
    given, receives each calibrated row's method state, for tests/reference.py)."""
    from kvbench.calibration import calibration_batches, collect, without_sink
    from kvbench.config import KVConfig
    from kvbench.eval.ppl import perplexity
    from kvbench.cache import patched
    from kvbench.registry import get

    torch.manual_seed(0)
    model, tok, info = embedded_model
    cls = get("method", "kvquant")
    batches = calibration_batches(tok, splits.joined("calib"), CALIB["num_samples"], CALIB["seqlen"], CALIB["seed"])
    stats = collect(model, batches, frozenset({"keys", "values", "fisher"}), progress=False)
    ids = tok(splits.joined("eval"), return_tensors="pt").input_ids[0]
    rows = {}
    for row, spec in SMALL_ROWS.items():
        if spec is None:
            p = perplexity(model, ids, EVAL["seqlen"], EVAL["max_windows"], progress=False)
            rows[row] = {"ppl": p["ppl"], "avg_bits": 16.0}
            continue
        bits, fields = spec
        m = cls(cls.config_class(**fields), KVConfig(bits=bits), info)
        if m.calibration_needs():
            m.load_state(m.calibrate(without_sink(stats, m.cfg.sink_tokens)))
            if states is not None:
                states[row] = m.state
        with patched(model, m):
            p = perplexity(model, ids, EVAL["seqlen"], EVAL["max_windows"], progress=False)
        rows[row] = {"ppl": p["ppl"], "avg_bits": m.avg_bits(EVAL["seqlen"])}
    return rows


def ablation() -> dict:
    """The ablation rows of the results store (``reports/runs``), found by their composed configs."""
    import yaml

    from kvbench.tracking import store as results
    from kvbench.sweep import compose

    spec = yaml.safe_load((ROOT / "sweeps" / "kvquant_ablation.yaml").read_text())
    rows = {}
    for exp in spec["parameters"]["experiment"]["values"]:
        overrides = [f"experiment={exp}", *SWEEP_EXTRA]
        cfg = compose(overrides)
        out = results.run_dir(cfg)
        f = ROOT / out / "metrics.json"
        if not f.exists():
            print(f"missing: {out} (python -m kvbench {' '.join(overrides)})", file=sys.stderr)
            continue
        m = json.loads(f.read_text())
        rows[exp.split("/")[-1]] = {"ppl": m["ppl"], "avg_bits": m["avg_bits"], "run_dir": str(out),
                                    "command": "python -m kvbench " + " ".join(overrides)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ablation", action="store_true", help="collect the ablation from reports/runs")
    args = ap.parse_args()
    if args.ablation:
        out = HERE / "kvquant_ablation.json"
        data = {"script": "tests/golden/make_kvquant.py --ablation", "tolerance_rel": 0.002,
                "setting": "SmolLM2-135M, embedded wiki eval text, 1 window x 2048 tokens, calibration 16 x 512 (Fisher)",
                "rows": ablation()}
    else:
        sys.path.insert(0, str(HERE.parent))
        from conftest import _load

        from kvbench.config import DataConfig
        from kvbench.data import load_splits
        from omegaconf import OmegaConf

        splits = load_splits(OmegaConf.structured(DataConfig(name="wiki")))
        out = HERE / "kvquant.json"
        data = {"script": "tests/golden/make_kvquant.py", "atol": 1e-3, "calib": CALIB, "eval": EVAL,
                "rows": small(_load("smollm2-135m"), splits)}
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data["rows"], indent=2))
    if args.ablation:
        print(markdown(data["rows"]))


LABELS = {
    "fp16": "fp16", "int3_token": "int3 per-token (keys and values)", "channel_keys": "+ per-channel keys",
    "pre_rope": "+ pre-RoPE keys", "nuq_plain": "+ NUQ, plain k-means", "nuq": "+ NUQ, Fisher-weighted k-means",
    "nuq3_1pct": "+ 1 % dense-and-sparse = nuq3-1 %", "nuq4_1pct": "nuq4-1 %", "nuq2_1pct": "nuq2-1 %",
    "nuq2_1pct_qnorm": "nuq2-1 % + Q-Norm", "int4_token": "int4 per-token", "int2_token": "int2 per-token",
}


def markdown(rows: dict) -> str:
    """The README table: row, perplexity, change against the row above (ablation steps), avg bits."""
    order = ["fp16", "int3_token", "channel_keys", "pre_rope", "nuq_plain", "nuq", "nuq3_1pct",
             "int4_token", "nuq4_1pct", "int2_token", "nuq2_1pct", "nuq2_1pct_qnorm"]
    prev = {"channel_keys": "int3_token", "pre_rope": "channel_keys", "nuq_plain": "pre_rope", "nuq": "pre_rope",
            "nuq3_1pct": "nuq", "nuq2_1pct_qnorm": "nuq2_1pct"}
    lines = ["| configuration | ppl | change | avg bits | run |", "|---|---|---|---|---|"]
    for row in order:
        if row not in rows:
            continue
        r = rows[row]
        d = f"{r['ppl'] - rows[prev[row]]['ppl']:+.3f}" if row in prev and prev[row] in rows else ""
        lines.append(f"| {LABELS[row]} | {r['ppl']:.3f} | {d} | {r['avg_bits']:.2f} | `{r['run_dir']}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
