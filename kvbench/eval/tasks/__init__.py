"""lm-eval task YAMLs for the offline suite (this folder is the harness's ``include_path``).

Each YAML keeps the standard lm-eval definition of its task (prompt, choices, metrics) under the
standard name, and reads its data through :mod:`kvbench.eval.tasks.offline` instead of the hub:
the zero-shot suite beside this file, ``gsm8k`` and ``gsm8k_cot``, ``mmlu/`` (the ``mmlu`` groups and
``mmlu_<subject>``) and ``ruler/`` (RULER's synthetic tasks, sized with the run's tokenizer).
"""

import re
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
RULER_QA = ("ruler_qa_squad", "ruler_qa_hotpot")  # RULER's QA tasks: SQuAD v2 / HotpotQA, which no package here ships


def _names() -> tuple[str, ...]:
    names = set()
    for path in TASK_DIR.rglob("*.yaml"):
        m = re.search(r"^(?:task|group): (\w+)$", path.read_text(), re.M)
        if m:
            names.add(m.group(1))
    return tuple(sorted(names))


OFFLINE_TASKS = _names()
OFFLINE_SUMMARY = ", ".join(n for n in OFFLINE_TASKS if not n.startswith("mmlu_")) + ", mmlu_<subject>"
"""The offline task names for one-line messages (the 57 MMLU subjects folded into ``mmlu_<subject>``)."""
