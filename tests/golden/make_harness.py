"""Golden fp16 results of the embedded SmolLM2-135M (CPU, fp32) on two offline lm-eval tasks.

Run from the repository root: ``python tests/golden/make_harness.py`` -> ``tests/golden/harness.json``
(checked by ``tests/test_harness.py::test_golden_fp16_embedded``).
"""

from __future__ import annotations

import json
from pathlib import Path

TASKS = ["piqa", "arc_easy"]
LIMIT = 8


def loglikelihoods(results: dict, task: str) -> list[list[float]]:
    """Per document (in doc_id order), the log-likelihood of each choice."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def golden(model, tok) -> dict:
    from kvbench.eval.harness import per_task, run_tasks

    res = run_tasks(model, tok, TASKS, limit=LIMIT, log_samples=True)
    table = per_task(res)
    return {t: {"acc": table[t]["acc"], "acc_norm": table[t]["acc_norm"], "n": table[t]["n"], "loglikelihoods": loglikelihoods(res, t)} for t in TASKS}


def main() -> None:
    import torch
    from omegaconf import OmegaConf

    from kvbench.config import ModelConfig
    from kvbench.model import load_model

    torch.manual_seed(0)
    model, tok, _ = load_model(OmegaConf.structured(ModelConfig(name="smollm2-135m", embedded="smollm2-135m")))
    out = {"model": "smollm2-135m", "dtype": "float32", "tasks": TASKS, "limit": LIMIT, "results": golden(model, tok)}
    path = Path(__file__).with_name("harness.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
