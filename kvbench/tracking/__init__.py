"""Recording runs: the local results store keyed by content (:mod:`.store`) and Weights & Biases
(:mod:`.wandb`)."""

from kvbench.tracking.store import load, run_dir

__all__ = ["load", "run_dir"]
