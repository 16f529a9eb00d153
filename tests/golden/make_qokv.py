"""Golden perplexities of QoKV on the embedded SmolLM2-135M (CPU, fp32) for tests/test_qokv.py.

Run from the repo root: ``python tests/golden/make_qokv.py`` -> tests/golden/qokv.json.
Settings (smaller than conf/experiment/qokv_ablation.yaml, so the test can recompute the QoKV
row): embedded wiki split, one 512-token window, calibration on 2 x 512 tokens with the Fisher
information.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import compose_config  # noqa: E402

SETTINGS = ["eval.seqlen=512", "eval.max_windows=1", "calib.num_samples=2", "calib.seqlen=512",
            "logging.progress=false"]
RUNS = {
    "fp16": ["method=fp16"],
    "uniform4": ["method=uniform", "kv.bits=4"],
    "qokv4": ["method=qokv", "kv.bits=4"],
}


def measure(model, tok, info, splits, runs=RUNS, cache_dir=None) -> dict:
    """Perplexity and average bits of each named run (same code path as ``python -m kvbench``)."""
    from kvbench.calibration import prepare
    from kvbench.run import build_method, evaluate

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs.items():
            cfg = compose_config([*overrides, *SETTINGS, f"calib.cache_dir={cache_dir or tmp}"])
            method = build_method(cfg, info)
            if method.calibration_needs():
                prepare(cfg, model, tok, splits, method)
            ppl = evaluate(cfg, model, tok, splits, method)["ppl"]
            out[name] = {"ppl": ppl, "avg_bits": method.avg_bits(cfg.eval.seqlen)}
    return out


if __name__ == "__main__":
    from omegaconf import OmegaConf

    from kvbench.config import DataConfig, ModelConfig
    from kvbench.data import load_splits
    from kvbench.model import load_model

    model, tok, info = load_model(OmegaConf.structured(ModelConfig(name="smollm2-135m", embedded="smollm2-135m")))
    splits = load_splits(OmegaConf.structured(DataConfig(name="wiki")))
    result = {"settings": SETTINGS, "runs": measure(model, tok, info, splits)}
    path = Path(__file__).with_name("qokv.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
