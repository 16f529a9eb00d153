"""Weights & Biases logging (offline by default: no account or network needed).

``logging.wandb.mode``: ``offline`` writes ``<run dir>/wandb/offline-run-*`` (upload later with
``wandb sync``), ``online`` needs ``WANDB_API_KEY`` or ``wandb login``, ``disabled`` skips W&B.
A run started by ``wandb agent`` (``WANDB_SWEEP_ID`` set) is logged online whatever the mode, since
the agent's sweep only sees runs that reach its server.

Each finished run logs:
  * config: the whole resolved Hydra config, flattened to dotted keys (``kv.bits``), plus
    ``run_id`` (the results-store hash) and ``run_dir``: the same columns as
    :func:`kvbench.tracking.store.load`;
  * summary: every metric, flattened (``ppl``, ``ppl_info.context``, ``time.eval_s``, ...);
  * one ``wandb.Table`` per nested metric table (e.g. per-task accuracies);
  * artifacts: the run's results (``config.yaml``, ``metrics.json``, ``env.json``) and, when the
    method was calibrated, a reference to its calibration artifact (safetensors + JSON sidecar).
Name, group and tags are derived from the config (:func:`run_name`, :func:`run_group`,
:func:`run_tags`).

A run counts as logged only once its W&B run finished: ``<run dir>/wandb/kvbench.json`` (the
marker) is written with ``complete: false`` before W&B starts and with the W&B run id and
``complete: true`` after ``wandb.finish()`` returns. A reused run whose marker is missing or
incomplete (Ctrl-C during W&B start-up, online logging that failed) is logged again, its partial W&B
run folders replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from kvbench.errors import UserError
from kvbench.tracking.store import atomic_write, flatten

MODES = ("offline", "online", "disabled")
RESULT_FILES = ("config.yaml", "metrics.json", "env.json")
MARKER = "kvbench.json"  # in <wandb dir>/wandb/


def run_name(cfg) -> str:
    """``<method>-<bits>b-<model>-<data>``, e.g. ``uniform-4b-smollm2-135m-wiki``."""
    return f"{cfg.method.name}-{cfg.kv.bits}b-{cfg.model.name}-{cfg.data.name}"


def run_group(cfg) -> str:
    """Runs of one experiment on one model are grouped together."""
    return f"{cfg.experiment}/{cfg.model.name}"


def run_tags(cfg) -> list[str]:
    return [cfg.method.name, f"{cfg.kv.bits}bit", cfg.model.name, cfg.data.name, cfg.eval.name, cfg.experiment]


def wandb_mode(cfg) -> str:
    """The effective W&B mode: the configured one, except ``online`` under a W&B sweep agent."""
    mode = cfg.logging.wandb.mode
    if mode not in MODES:
        raise UserError(f"logging.wandb.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "offline" and os.environ.get("WANDB_SWEEP_ID"):
        return "online"
    return mode


def logged_config(cfg, run_path) -> dict:
    """The W&B config of a run: the resolved config with dotted keys, plus its results-store id and
    the results version it was computed at (the columns of :func:`kvbench.tracking.store.load`)."""
    from kvbench.tracking.store import run_results_version

    d = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    out = flatten(d)
    out["run_dir"] = str(run_path)
    out["run_id"] = Path(run_path).name
    out["results_version"] = run_results_version(Path(run_path))
    return out


def metric_tables(metrics: dict) -> dict[str, tuple[list[str], list[list]]]:
    """Nested metric tables as ``{name: (columns, rows)}``.

    A metric whose value maps names to flat dicts of scalars, such as
    ``{"tasks": {"piqa": {"acc": 0.65, "acc_norm": 0.66}, "arc_easy": {"acc": 0.48}}}``, becomes one
    table with a row per name: ``columns = ["tasks", "acc", "acc_norm"]``, missing cells ``None``.
    """
    tables = {}
    for name, value in metrics.items():
        if not isinstance(value, dict) or not value:
            continue
        if not all(isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values())
                   for v in value.values()):
            continue
        cols = []
        for row in value.values():
            cols += [c for c in row if c not in cols]
        rows = [[key, *(row.get(c) for c in cols)] for key, row in value.items()]
        tables[name] = ([name, *cols], rows)
    return tables


def marker(wandb_dir) -> dict:
    """The W&B marker of a run (``{}`` if it has none): ``{"complete", "id", "mode", "calibration"}``."""
    try:
        return json.loads((Path(wandb_dir) / "wandb" / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def log_run(cfg, metrics: dict, run_path, calibration=None, wandb_dir=None, reused: bool = False) -> str | None:
    """Log one finished run to W&B.

    Args:
        cfg: the resolved run config.
        metrics: the run's metrics (as in ``metrics.json``).
        run_path: its results-store directory (holds the result files logged as an artifact).
        calibration: path of the calibration artifact (``.safetensors``) the run used, if any
            (default for a reused run: the one its marker recorded).
        wandb_dir: where W&B writes its files (default: ``run_path``).
        reused: the run had already finished and is being reused; it is logged again only under
            a W&B sweep agent (which needs a run to report to its sweep), or if its marker is
            missing or incomplete (it ran with W&B disabled, or logging was interrupted or failed).

    Returns:
        The W&B run's local files directory, or None when nothing was logged.
    """
    mode = wandb_mode(cfg)
    wandb_dir = Path(wandb_dir or run_path)
    before = marker(wandb_dir)
    if mode == "disabled" or (reused and not os.environ.get("WANDB_SWEEP_ID") and before.get("complete")):
        return None
    if not before.get("complete"):  # an interrupted or failed earlier attempt: replace its partial files
        for partial in [*wandb_dir.glob("wandb/offline-run-*"), *wandb_dir.glob("wandb/run-*")]:
            shutil.rmtree(partial, ignore_errors=True)
    if calibration is None and before.get("calibration"):
        calibration = before["calibration"]
    state = {"complete": False, "id": None, "mode": mode, "calibration": str(calibration) if calibration else None}
    atomic_write(wandb_dir / "wandb" / MARKER, json.dumps(state, indent=2))
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    try:
        run = wandb.init(
            project=cfg.logging.wandb.project,
            entity=cfg.logging.wandb.entity,
            mode=mode,
            name=run_name(cfg),
            group=run_group(cfg),
            tags=run_tags(cfg),
            config=logged_config(cfg, run_path),
            dir=str(wandb_dir),
            reinit="finish_previous",
            allow_val_change=True,
        )
    except wandb.errors.UsageError as e:  # e.g. online without `wandb login`
        raise UserError(f"W&B {mode} logging failed ({str(e).splitlines()[0]}); the results are saved in {run_path}; "
                        "rerun with logging.wandb.mode=offline to log it locally") from None
    try:
        run.summary.update(flatten(metrics))
        for name, (columns, rows) in metric_tables(metrics).items():
            run.log({f"table/{name}": wandb.Table(columns=columns, data=rows)})
        run_path = Path(run_path)
        results = wandb.Artifact(f"results-{run_path.name}", type="results", metadata={"run_dir": str(run_path)})
        for f in RESULT_FILES:
            if (run_path / f).exists():
                results.add_file(str(run_path / f))
        run.log_artifact(results)
        if calibration is not None:
            calibration = Path(calibration)
            art = wandb.Artifact(f"calib-{cfg.method.name}-{calibration.stem}", type="calibration",
                                 metadata={"path": str(calibration), "method": cfg.method.name, "model": cfg.model.name})
            for f in (calibration, calibration.with_suffix(".json")):
                if f.exists():
                    art.add_reference(f.resolve().as_uri(), name=f.name)
            run.log_artifact(art)
        directory = run.dir
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    atomic_write(wandb_dir / "wandb" / MARKER, json.dumps({**state, "complete": True, "id": run.id}, indent=2))
    return str(directory)


def offline_runs(root) -> list[Path]:
    """All offline W&B run folders under ``root`` (what ``wandb sync`` uploads), oldest first."""
    return sorted(Path(root).glob("**/wandb/offline-run-*"))


def _inspect(path, *flags: str) -> str:
    exe = Path(sys.executable).with_name("wandb")
    cmd = [str(exe) if exe.exists() else "wandb", "leet", "inspect", *flags, "--json", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        err = out.stderr.strip().splitlines()
        raise UserError(f"cannot read W&B run {path}: {err[-1] if err else f'exit code {out.returncode}'}")
    return out.stdout


def read_offline_run(path, artifacts: bool = False) -> dict:
    """Read a W&B run back from its local files (no server needed).

    Args:
        path: an ``offline-run-*`` folder, its ``.wandb`` file, or a ``wandb`` folder (latest run).
        artifacts: also list the logged artifacts (reads every record of the run).

    Returns:
        ``{"config": {...}, "summary": {...}, "state": ..., "name": ..., "tags": [...], ...}`` as
        printed by ``wandb leet inspect --summary --json``; with ``artifacts``, also
        ``"artifacts": [{"name": ..., "type": ..., "metadata": {...}}, ...]``.
    """
    run = json.loads(_inspect(path, "--summary"))
    if artifacts:
        run["artifacts"] = []
        for line in _inspect(path).splitlines():
            rec = json.loads(line)
            if rec.get("type") == "artifact":
                a = rec["artifact"]
                run["artifacts"].append({"name": a["name"], "type": a["type"], "metadata": json.loads(a.get("metadata") or "{}")})
    return run
