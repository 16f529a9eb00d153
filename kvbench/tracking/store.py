"""The local results store: one directory per resolved config, never overwritten.

A run lives in ``<output_dir>/<experiment>/<method>/<hash>/`` where ``hash`` is the SHA-1 of the
resolved config without the keys that do not change results (logging, output_dir, rerun), the
content fingerprints of its inputs (:func:`inputs`: data file, model weights; a file's path is not
part of its identity, its content is) and :data:`RESULTS_VERSION`. It holds ``config.yaml``,
``inputs.json`` (the fingerprints), ``env.json`` (git commit, package versions) and ``metrics.json``
(written last, atomically: a run without it is incomplete). :func:`load` turns the store into a pandas frame, one
row per run, config columns with dotted names plus metric columns.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

NON_RESULT_KEYS = ("logging", "output_dir", "command", "rerun")

RESULTS_VERSION = 2  # 2: calibration leaves the sink tokens out for every method (QoKV changed)
"""Part of every run hash. Bump it in the commit whose code change alters numbers (a fixed
quantizer, another perplexity convention): every stored run then has a new hash and recomputes.
Changes that alter no number (speed, messages, new options whose default keeps the old behaviour)
leave it alone."""


UNHASHED_DEFAULTS = {
    "eval": {"max_seq_lengths": [4096], "ruler_haystack": "wiki", "chat_template": None, "system_instruction": None},
    "model": {"chat_template": False},
}
"""Config keys left out of the run hash at these values: options added after runs were stored, whose value here
gives what those runs computed (RULER options touch no other task; no chat template was applied before)."""


def result_config(cfg) -> dict:
    """The resolved config as a plain dict, without keys that do not change the result (and without
    ``kv.kernel`` when the simulated backend runs no kernel, nor ``kv.prefill`` at its default
    ``quantized``, so runs made before the option existed keep their hash)."""
    d = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    for k in NON_RESULT_KEYS:
        d.pop(k, None)
    model = d.get("model")
    if isinstance(model, dict) and not model.get("random_init", False):  # real weights: their fingerprint says it all
        d["model"] = {k: v for k, v in model.items() if k not in ("random_init", "init_seed", "architecture")}
    kv = d.get("kv")
    if isinstance(kv, dict) and kv.get("backend", "simulated") == "simulated" and "kernel" in kv:
        d["kv"] = kv = {k: v for k, v in kv.items() if k != "kernel"}
    if isinstance(kv, dict) and kv.get("prefill") == "quantized":  # the behaviour of every run before kv.prefill existed
        d["kv"] = {k: v for k, v in kv.items() if k != "prefill"}
    for group, defaults in UNHASHED_DEFAULTS.items():  # options added later, at the value that changes nothing
        sub = d.get(group)
        if isinstance(sub, dict):
            d[group] = {k: v for k, v in sub.items() if not (k in defaults and v == defaults[k])}
    return d


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, cached by (absolute path, size, mtime_ns) in the kvbench cache.

    Model weights run to many GB: they are read once, and again only after the file changes.
    """
    from kvbench.local import cache_root

    p = Path(path).expanduser().resolve()
    st = p.stat()
    ident = hashlib.sha1(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_root() / "digests" / ident
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    try:
        atomic_write(memo, h.hexdigest())
    except OSError:  # a read-only cache only costs time
        pass
    return h.hexdigest()


def inputs(cfg) -> dict:
    """Content fingerprints of what a run reads: ``{"data": ..., "model": ...}``.

    See :func:`kvbench.data.data_fingerprint` and :func:`kvbench.model.model_fingerprint`; both
    read no weights beyond hashing local files (cached), so this runs before the model loads.
    """
    from kvbench.data import data_fingerprint
    from kvbench.model import model_fingerprint

    return {"data": data_fingerprint(cfg.data), "model": model_fingerprint(cfg.model)}


def config_hash(cfg, fingerprints: dict | None = None) -> str:
    """The run's identity: resolved config (less :data:`NON_RESULT_KEYS` and file paths), the
    content fingerprints of its inputs (:func:`inputs`, computed unless given) and
    :data:`RESULTS_VERSION`."""
    config = result_config(cfg)
    for group in ("data", "model"):  # a moved file is the same input; an edited one is not
        if isinstance(config.get(group), dict):
            config[group].pop("path", None)
    ident = {"config": config, "inputs": inputs(cfg) if fingerprints is None else fingerprints,
             "results_version": RESULTS_VERSION}
    blob = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def run_dir(cfg, fingerprints: dict | None = None) -> Path:
    """``<output_dir>/<experiment>/<method>/<config_hash>``."""
    root = Path(cfg.output_dir).expanduser()
    return root / cfg.experiment / cfg.method.name / config_hash(cfg, fingerprints)


def run_commit(path: Path) -> str:
    """The git commit recorded in the ``env.json`` of the run in ``path`` ("unknown" if none)."""
    try:
        return json.loads((path / "env.json").read_text()).get("git_commit") or "unknown"
    except (OSError, ValueError):
        return "unknown"


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename: never a half-written file.

    The file gets the mode ``open()`` would give it (``0o666`` less the umask), so a results store on a
    shared filesystem stays readable by the group when the umask allows it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunBusy(Exception):
    """The run is being computed by another process (:func:`run_lock` with ``wait=False``)."""


_HELD = threading.local()


def lock_path(out: Path) -> Path:
    """The lock file of the run in ``out``: beside it, present while a process holds it."""
    return out.parent / f".{out.name}.lock"


def _flock(path: Path, blocking: bool) -> int | None:
    """Lock ``path``'s file; its descriptor, or None when the file was removed meanwhile (try again)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RunBusy(path) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


@contextmanager
def run_lock(out: Path, wait: bool = True):
    """Hold the lock of the run in ``out``: one process computes (and logs) a run, the others wait.

    An advisory ``flock`` on :func:`lock_path`, released by the OS if the holder dies. The holder
    removes the file before it lets go, and a waiter that then wins the removed file tries again on
    the path's new one, so two processes never hold one run. Re-entrant within a thread (the sweep
    runner holds it around :func:`kvbench.run.run`, which takes it again).

    Args:
        out: the run's directory (:func:`run_dir`).
        wait: block until the lock is free (saying so once on stderr), else raise :class:`RunBusy`.
    """
    path = lock_path(out)
    held = _HELD.__dict__.setdefault("paths", set())
    key = os.path.abspath(path)
    if key in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, told = None, False
    while fd is None:
        try:
            fd = _flock(path, blocking=False)
        except RunBusy:
            if not wait:
                raise RunBusy(f"{out} is being computed by another process") from None
            if not told:
                print(f"kvbench: {out} is being computed by another process; waiting for it", file=sys.stderr)
                told = True
            fd = _flock(path, blocking=True)
    held.add(key)
    try:
        yield
    finally:
        held.discard(key)
        path.unlink(missing_ok=True)  # still ours: a waiter on this file will retry on a new one
        os.close(fd)


def existing_metrics(path: Path) -> dict | None:
    f = path / "metrics.json"
    return json.loads(f.read_text()) if f.exists() else None


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    env = {"results_version": RESULTS_VERSION}
    for pkg in ("kvbench", "torch", "transformers", "lm_eval", "triton"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        here = Path(__file__).resolve().parent
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def save_run(path: Path, cfg, metrics: dict) -> None:
    """Write config, environment and (last) metrics of a finished run."""
    atomic_write(path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write(path / "env.json", json.dumps(environment(), indent=2))
    atomic_write(path / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists become JSON strings, so cells stay hashable)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def load(output_dir: str | os.PathLike = "outputs", wandb: str | None = None, filters: dict | None = None, api=None):
    """All finished runs under ``output_dir`` as a DataFrame (config columns + metric columns).

    With ``wandb="entity/project"``, the finished kvbench runs of that W&B project instead (see
    :func:`load_wandb`), in the same columns.
    """
    import pandas as pd

    if wandb is not None:
        return load_wandb(wandb, filters=filters, api=api)
    rows = []
    for mfile in sorted(Path(output_dir).glob("**/metrics.json")):
        run = mfile.parent
        cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
        row = flatten(cfg)
        row.update(flatten(json.loads(mfile.read_text()), "metrics."))
        row["run_dir"] = str(run)
        row["run_id"] = run.name
        row["results_version"] = run_results_version(run)
        rows.append(row)
    return pd.DataFrame(rows)


def run_results_version(run: Path) -> int:
    """The :data:`RESULTS_VERSION` a stored run was computed at (1: runs from before it was recorded)."""
    try:
        return int(json.loads((run / "env.json").read_text()).get("results_version", 1))
    except (OSError, ValueError):
        return 1


def wandb_row(config: dict, summary: dict) -> dict | None:
    """The results row of a W&B run logged by :mod:`kvbench.tracking.wandb` (None for other runs).

    Its config holds the flattened resolved config plus ``run_dir`` and ``run_id``; its summary the
    flattened metrics. Keys W&B adds (``_runtime``, ``_step``, tables) and a sweep's own parameter
    names that shadow a config group (``method`` beside ``method.name``) are dropped.
    """
    if "run_id" not in config:
        return None
    config = flatten({k: v for k, v in config.items() if not k.startswith("_")})  # nested or dotted: same keys
    keys = [k for k in config if k not in ("run_dir", "run_id", "results_version")]
    row = {k: config[k] for k in keys if not any(o.startswith(k + ".") for o in keys)}
    metrics = flatten({k: v for k, v in summary.items()
                       if not k.startswith(("_", "table/")) and not (isinstance(v, dict) and "_type" in v)})
    row.update({f"metrics.{k}": metrics[k] for k in sorted(metrics)})
    row["run_dir"] = config["run_dir"]
    row["run_id"] = config["run_id"]
    row["results_version"] = int(config.get("results_version", 1))
    return row


def load_wandb(path: str, filters: dict | None = None, api=None):
    """Finished kvbench runs of the W&B project ``path`` (``entity/project``) as a DataFrame.

    Same columns as :func:`load`; one row per results-store run (the newest W&B run wins when a run
    was logged twice). ``filters`` is a W&B (MongoDB-style) run filter, e.g.
    ``{"config.model.name": "smollm2-135m"}``; ``api`` defaults to ``wandb.Api()`` (needs a key).
    """
    import pandas as pd

    if api is None:
        import wandb

        api = wandb.Api()
    rows, seen = [], set()
    for run in api.runs(path, filters={"state": "finished", **(filters or {})}, order="-created_at"):
        row = wandb_row(dict(run.config), dict(run.summary_metrics))
        if row is not None and row["run_id"] not in seen:
            seen.add(row["run_id"])
            rows.append(row)
    return pd.DataFrame(rows)
