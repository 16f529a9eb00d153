"""lm-eval task YAMLs for the offline suite (this folder is the harness's ``include_path``).

Each YAML keeps the standard lm-eval definition of its task (prompt, choices, metrics) under the
standard name, and reads its data through :mod:`kvbench.eval.tasks.offline` instead of the hub.
"""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
OFFLINE_TASKS = tuple(sorted(p.stem for p in TASK_DIR.glob("*.yaml")))
