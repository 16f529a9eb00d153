"""Golden passkey answers of the embedded SmolLM2-135M (CPU, fp32, fp16 KV) at 2048 tokens.

Run from the repository root: ``python tests/golden/make_passkey.py`` -> ``tests/golden/passkey.json``
(checked by ``tests/test_passkey.py::test_golden_fp16_embedded_2k``).
"""

from __future__ import annotations

import json
from pathlib import Path

LENGTHS = [2048]
DEPTHS = [0.25, 0.75]
SEED = 0


def golden(model, tok, text: str) -> dict:
    from kvbench.eval.passkey import passkey_grid

    res = passkey_grid(model, tok, text, LENGTHS, DEPTHS, trials=1, seed=SEED, progress=False)
    return {"acc": res["acc"], "answers": res["answers"]}


def main() -> None:
    from omegaconf import OmegaConf

    from kvbench.config import DataConfig, ModelConfig
    from kvbench.data import load_splits
    from kvbench.model import load_model

    model, tok, _ = load_model(OmegaConf.structured(ModelConfig(name="smollm2-135m", embedded="smollm2-135m")))
    text = load_splits(OmegaConf.structured(DataConfig(name="wiki"))).joined("eval")
    out = {"model": "smollm2-135m", "lengths": LENGTHS, "depths": DEPTHS, "seed": SEED, **golden(model, tok, text)}
    path = Path(__file__).with_name("passkey.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}: acc {out['acc']}")


if __name__ == "__main__":
    main()
