"""Weights & Biases logging (offline by default: no account or network needed).

``logging.wandb.mode``: ``offline`` writes ``wandb/offline-run-*`` (upload later with
``wandb sync``), ``online`` needs ``WANDB_API_KEY`` or ``wandb login``, ``disabled`` skips W&B.
"""

from __future__ import annotations

import os

from kvbench.results import flatten, result_config


def run_name(cfg) -> str:
    return f"{cfg.method.name}-{cfg.kv.bits}b-{cfg.model.name}-{cfg.data.name}"


def log_run(cfg, metrics: dict, run_path, wandb_dir=None) -> str | None:
    """Log one finished run; returns the W&B run directory (None when disabled)."""
    mode = cfg.logging.wandb.mode
    if mode == "disabled":
        return None
    if mode not in ("offline", "online"):
        raise ValueError(f"logging.wandb.mode must be offline, online or disabled, got {mode!r}")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(
        project=cfg.logging.wandb.project,
        entity=cfg.logging.wandb.entity,
        mode=mode,
        name=run_name(cfg),
        group=f"{cfg.experiment}/{cfg.model.name}",
        tags=[cfg.method.name, f"{cfg.kv.bits}bit", cfg.model.name, cfg.data.name, cfg.eval.name],
        config=flatten(result_config(cfg)),
        dir=str(wandb_dir or run_path),
        reinit="finish_previous",
    )
    run.summary.update(flatten(metrics))
    run.summary["run_dir"] = str(run_path)
    directory = run.dir
    run.finish()
    return str(directory)
