"""Run a W&B sweep file without a W&B server: ``python -m kvbench.sweep sweeps/bits.yaml``.

The same file works with ``wandb sweep sweeps/bits.yaml`` + ``wandb agent``. Here, the official
``sweeps`` package (the W&B sweep controller's own search code) expands it:

* ``method: grid``: every combination, in the controller's order;
* ``method: random``: ``--count`` samples, seeded (``--seed``) so a restarted sweep draws the same runs;
* ``method: bayes`` needs the metrics of finished runs, kept by a W&B server: use ``wandb agent``.

Each run's Hydra overrides are built from the sweep's ``command`` exactly as ``wandb agent`` builds
its argv (the words after ``-m kvbench``, ``${args_no_hyphens}`` expanded), followed by the overrides
given on this command line (e.g. ``model=tiny-llama``), which win. Every run is composed with
Hydra before anything runs, so a malformed file fails at once with one line. A run whose results
already exist (:func:`kvbench.tracking.store.run_dir` of its composed config holds ``metrics.json``) is
skipped, so a killed sweep resumes where it stopped. Several runners can share one sweep: a run
another runner is computing (its lock is held) is left to the end and then awaited, and every runner
exits 0 once every run of the sweep is done. Runs execute in this process, one after the other.

Usage::

    python -m kvbench.sweep sweeps/bits.yaml [--dry-run] [--count N] [--seed S] [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from kvbench.tracking import store as results
from kvbench.config import compose
from kvbench.errors import UserError
from kvbench.validate import check_values

PARAM_MACROS = ("${args_no_hyphens}", "${args_override_hydra}", "${args_append_hydra}")
SKIPPED_MACROS = ("${env}", "${interpreter}", "${program}")
METHODS = ("grid", "random", "bayes")
MAX_GRID = 1_000_000
ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")  # as wandb agent: ${envvar:NAME}


@dataclass
class PlannedRun:
    """One run of a sweep: its overrides, composed config and results directory."""

    params: dict
    overrides: list[str]
    cfg: object = None
    out: Path | None = None
    done: bool = False


def _sweeps():
    """The official ``sweeps`` package (its pydantic-v1 style models warn on import under v2)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def read_spec(path) -> dict:
    """Read and validate a W&B sweep file (the ``sweeps`` package's JSON schema + kvbench's needs)."""
    schema_violations_from_proposed_config = _sweeps().schema_violations_from_proposed_config
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read sweep file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path} must be a mapping with method, parameters and command (a W&B sweep)")
    try:
        problems = schema_violations_from_proposed_config(spec)
    except ValueError as e:
        problems = [str(e)]
    if problems:
        raise UserError(f"{path} is not a valid W&B sweep: {'; '.join(p.replace(chr(10), ' ') for p in problems)}")
    if spec.get("method") not in METHODS:
        raise UserError(f"{path}: method must be one of {', '.join(METHODS)}, got {spec.get('method')!r}")
    if not spec.get("parameters"):
        raise UserError(f"{path}: a sweep needs at least one entry under parameters")
    command_words(spec, path)
    return spec


def command_words(spec: dict, path="sweep") -> list[str]:
    """The words of the sweep's ``command`` after ``-m kvbench``: fixed overrides and one macro.

    The command must run kvbench and pass the parameters as Hydra overrides, as
    ``[${env}, ${interpreter}, -m, kvbench, ${args_no_hyphens}]`` does.
    """
    command = [ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), str(c)) for c in spec.get("command") or []]
    macros = [c for c in command if c in PARAM_MACROS]
    if "kvbench" not in command or len(macros) != 1:
        raise UserError(f"{path}: command must run `-m kvbench` with the parameters as Hydra overrides, e.g. "
                        "[${env}, ${interpreter}, -m, kvbench, ${args_no_hyphens}]")
    rest = command[command.index("kvbench") + 1:]
    bad = [c for c in rest if c.startswith("${") and c not in PARAM_MACROS + SKIPPED_MACROS]
    if bad:
        raise UserError(f"{path}: command macro {bad[0]} is not a Hydra override; use ${{args_no_hyphens}}")
    return [c for c in rest if c not in SKIPPED_MACROS]


def run_overrides(spec: dict, params: dict, path="sweep") -> list[str]:
    """A run's Hydra overrides in the order ``wandb agent`` passes them (the macro expanded in place)."""
    out = []
    for word in command_words(spec, path):
        out += param_overrides(spec, params) if word in PARAM_MACROS else [word]
    return out


def param_overrides(spec: dict, params: dict) -> list[str]:
    """``{"kv.bits": {"value": 4}}`` -> ``["kv.bits=4"]``, as ``wandb agent`` writes its macros.

    ``${args_no_hyphens}`` gives ``k=v``, ``${args_append_hydra}`` ``+k=v`` and
    ``${args_override_hydra}`` ``++k=v`` (wandb.sdk.launch.sweeps.utils.create_sweep_command_args).
    """
    macro = next(str(c) for c in spec["command"] if str(c) in PARAM_MACROS)
    prefix = {"${args_no_hyphens}": "", "${args_append_hydra}": "+", "${args_override_hydra}": "++"}[macro]
    return [f"{prefix}{name}={p['value']}" for name, p in params.items()]


def expand(spec: dict, count: int | None = None, seed: int = 0) -> list[dict]:
    """The runs' parameters (``{"name": {"value": v}}``) of a grid or random sweep, in order."""
    next_runs = _sweeps().next_runs
    method = spec["method"]
    if method == "bayes":
        raise UserError("method: bayes picks each run from the metrics of finished runs, kept by a W&B server; "
                        "run it with `wandb sweep FILE` + `wandb agent` (the offline runner does grid and random)")
    if method == "grid":
        try:  # the controller stops at the end of the grid (a trailing None)
            runs = next_runs(spec, [], validate=True, n=MAX_GRID)
        except ValueError as e:
            raise UserError(f"grid sweep: {str(e).splitlines()[0]}") from None
        params = [r.config for r in runs if r is not None]
    else:
        if count is None:
            raise UserError("a random sweep has no end: give the number of runs with --count N")
        import numpy as np

        state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            params = [r.config for r in next_runs(spec, [], validate=True, n=count)]
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
    if count is not None:
        params = params[:count]
    return params


def plan(spec: dict, extra: list[str] = (), count: int | None = None, seed: int = 0, path="sweep") -> list[PlannedRun]:
    """Expand, compose and look up every run of the sweep (identical configs are planned once)."""
    planned, seen = [], set()
    for params in expand(spec, count, seed):
        overrides = run_overrides(spec, params, path) + list(extra)
        try:
            cfg = compose(overrides)
            check_values(cfg)  # ranges that need nothing but the config; --dry-run checks the rest
        except UserError as e:
            raise UserError(f"{path}: run `{' '.join(overrides)}`: {e}") from None
        out = results.run_dir(cfg)
        if out in seen:
            continue
        seen.add(out)
        planned.append(PlannedRun({k: v["value"] for k, v in params.items()}, overrides, cfg, out,
                                  results.existing_metrics(out) is not None))
    return planned


lock_path = results.lock_path  # the lock a runner holds while it computes a run (beside it, removed after)


def run_all(planned: list[PlannedRun], progress: bool = True) -> dict:
    """Run every planned run that is not done; returns counts of ran/skipped/failed runs.

    A run whose lock another runner holds is left to the end, then awaited: it is ``skipped`` once
    that runner finished it (or computed here if that runner failed), so several runners on one sweep
    share its runs and each ends when the whole sweep is done.
    """
    from tqdm.auto import tqdm

    todo = [p for p in planned if not p.done]
    for p in planned:
        if p.done and lock_path(p.out).exists():  # left by a runner killed between finishing a run and letting go
            with contextlib.suppress(results.RunBusy), results.run_lock(p.out, wait=False):
                pass
    counts = {"ran": 0, "skipped": len(planned) - len(todo), "failed": 0}
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress, file=sys.stderr)
    later = []
    for p in todo:
        try:
            _run_one(p, counts, bar, wait=False)
        except results.RunBusy:
            print(f"kvbench.sweep: {p.out} is being computed by another runner; waiting for it at the end",
                  file=sys.stderr)
            later.append(p)
    for p in later:
        _run_one(p, counts, bar, wait=True)
    bar.close()
    return counts


def _run_one(p: PlannedRun, counts: dict, bar, wait: bool) -> None:
    """Run ``p`` under its lock unless it is done by now (raises RunBusy if held and not ``wait``)."""
    from kvbench.run import run

    with results.run_lock(p.out, wait=wait):
        bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in p.params.items()))
        if results.existing_metrics(p.out) is not None:  # finished by another runner meanwhile
            counts["skipped"] += 1
        else:
            try:
                run(p.cfg)
                counts["ran"] += 1
            except KeyboardInterrupt:
                raise
            except UserError as e:
                counts["failed"] += 1
                print(f"kvbench.sweep: run `{' '.join(p.overrides)}` failed: {e}", file=sys.stderr)
            except Exception:  # noqa: BLE001 - one broken config must not stop the sweep
                counts["failed"] += 1
                print(f"kvbench.sweep: run `{' '.join(p.overrides)}` failed:", file=sys.stderr)
                traceback.print_exc()
    bar.update()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvbench.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="a W&B sweep file, e.g. sweeps/bits.yaml")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides added to every run (they win), e.g. model=tiny-llama")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done; run nothing")
    ap.add_argument("--count", type=int, default=None, help="at most this many runs (required for method: random)")
    ap.add_argument("--seed", type=int, default=0, help="seed of a random sweep's draws (default 0)")
    args = ap.parse_intermixed_args(argv)
    try:
        spec = read_spec(args.sweep)
        planned = plan(spec, args.overrides, args.count, args.seed, args.sweep)
        n_done = sum(p.done for p in planned)
        print(f"kvbench.sweep: {args.sweep}: {len(planned)} runs, {n_done} done, {len(planned) - n_done} to run",
              file=sys.stderr)
        if args.dry_run:
            from kvbench.validate import check

            for p in planned:  # the checks a run makes before loading weights, for every run
                try:
                    check(p.cfg)
                except UserError as e:
                    raise UserError(f"run `{' '.join(p.overrides)}`: {e}") from None
            for i, p in enumerate(planned):
                print(f"{i:4d}  {'done' if p.done else 'todo'}  {' '.join(p.overrides)}  -> {p.out}")
            return 0
        counts = run_all(planned, progress=bool(planned[0].cfg.logging.progress) if planned else True)
    except UserError as e:
        print(f"kvbench.sweep: error: {e}", file=sys.stderr)
        return 2
    print("kvbench.sweep: " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=sys.stderr)
    summary(spec, planned)
    return 0 if all(results.existing_metrics(p.out) is not None for p in planned) else 1


def summary(spec: dict, planned: list[PlannedRun]) -> None:
    """Print the sweep's metric for each finished run, best first (by the sweep's goal)."""
    metric = (spec.get("metric") or {}).get("name")
    if not metric:
        return
    rows = []
    for p in planned:
        value = results.flatten(results.existing_metrics(p.out) or {}).get(metric)
        if isinstance(value, (int, float)):
            rows.append((value, p))
    if not rows:
        return
    rows.sort(key=lambda r: r[0], reverse=spec["metric"].get("goal") == "maximize")
    print(f"{metric:>12}  run")
    for value, p in rows:
        print(f"{value:12.4f}  {' '.join(f'{k}={v}' for k, v in p.params.items())}")


if __name__ == "__main__":
    sys.exit(main())
