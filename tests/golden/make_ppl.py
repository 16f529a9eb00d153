"""Golden perplexities of the embedded SmolLM2-135M (CPU, fp32) for tests/test_ppl.py.

Run from the repo root: ``python tests/golden/make_ppl.py`` -> tests/golden/ppl.json.
Settings: embedded wiki eval split, eval.seqlen=512, eval.max_windows=4, uniform per-token K/V.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import compose_config  # noqa: E402

SETTINGS = ["eval.seqlen=512", "eval.max_windows=4", "logging.progress=false"]
RUNS = {"fp16": ["method=fp16"], **{f"int{b}": ["method=uniform", f"kv.bits={b}"] for b in (8, 4, 3, 2)}}


def measure(model, tok, info, splits, runs=RUNS) -> dict:
    """Perplexity of each named run (same code path as ``python -m kvbench``)."""
    from kvbench.run import build_method, evaluate

    out = {}
    for name, overrides in runs.items():
        cfg = compose_config([*overrides, *SETTINGS])
        out[name] = evaluate(cfg, model, tok, splits, build_method(cfg, info))["ppl"]
    return out


if __name__ == "__main__":
    from omegaconf import OmegaConf

    from kvbench.config import DataConfig, ModelConfig
    from kvbench.data import load_splits
    from kvbench.model import load_model

    model, tok, info = load_model(OmegaConf.structured(ModelConfig(name="smollm2-135m", embedded="smollm2-135m")))
    splits = load_splits(OmegaConf.structured(DataConfig(name="wiki")))
    result = {"settings": SETTINGS, "ppl": measure(model, tok, info, splits)}
    path = Path(__file__).with_name("ppl.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
