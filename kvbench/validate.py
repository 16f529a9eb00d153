"""One validation step before any weights load or calibration starts.

:func:`check` runs everything that needs no weights: value ranges, the group size against the
model's head_dim (from its ``config.json``), harness task names, a writable ``output_dir``, and the
data file (readable, UTF-8, enough tokens for one evaluation window and one calibration sample,
counted with the tokenizer alone). Each failure is a :class:`~kvbench.errors.UserError`: one line,
exit 2. ``python -m kvbench.sweep FILE --dry-run`` runs it for every planned run.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kvbench.config import SUPPORTED_BITS
from kvbench.errors import UserError

if TYPE_CHECKING:
    from kvbench.data import TextSplits
    from kvbench.method import KVMethod
    from kvbench.model import ModelInfo


@dataclass
class Checked:
    """What validation learned on the way, handed to the run so nothing is read twice.

    Attributes:
        info: the model's attention shapes, from its config.
        method: the configured method, built on ``info``.
        splits: calibration / evaluation texts (None for hub datasets, read later).
    """

    info: "ModelInfo"
    method: "KVMethod"
    splits: "Optional[TextSplits]"


def check(cfg) -> Checked:
    """Validate a composed run config without loading weights; raises ``UserError`` (one line).

    Args:
        cfg: the resolved run config (``python -m kvbench`` / a sweep's planned run).

    Returns:
        :class:`Checked` with the model's shapes, the built method and the data splits.
    """
    from kvbench.model import info_from_config, model_config
    from kvbench.run import build_method

    check_values(cfg)
    check_output_dir(cfg.output_dir)
    info = info_from_config(model_config(cfg.model), cfg.model.name, cfg.model.max_context)
    check_shapes(cfg, info)
    method = build_method(cfg, info)
    if cfg.kv.backend == "kernel" and not method.is_identity and cfg.kv.bits < 16:
        from kvbench.cache.packed import check_layout

        check_layout(cfg.kv.bits, info.head_dim)
        method.check_packable()  # the method's own refusals (components its packed format cannot hold)
        if cfg.eval.name == "harness" and cfg.eval.batch_size > 1:
            raise UserError(f"kv.backend=kernel packs the padding of a batch with the tokens, so scores would depend on "
                            f"eval.batch_size={cfg.eval.batch_size}: use eval.batch_size=1 (or kv.backend=simulated)")
    if cfg.eval.name == "harness":
        check_task_names(list(cfg.eval.tasks))
        ruler = [t for t in cfg.eval.tasks if t.startswith(("niah_", "ruler_"))]
        if ruler and max(cfg.eval.max_seq_lengths) > info.max_context:
            raise UserError(f"eval.max_seq_lengths={list(cfg.eval.max_seq_lengths)}: {ruler[0]} prompts of "
                            f"{max(cfg.eval.max_seq_lengths)} tokens exceed {cfg.model.name}'s context of {info.max_context}")
    return Checked(info, method, check_data(cfg, method))


def check_values(cfg) -> None:
    """Ranges of config values that need nothing but the config."""
    from kvbench.registry import plugins, unknown_name_error

    kv, ev, cal = cfg.kv, cfg.eval, cfg.calib
    if kv.bits not in SUPPORTED_BITS:
        raise UserError(f"kv.bits={kv.bits} is not supported; choose one of {list(SUPPORTED_BITS)}")
    if ev.name not in plugins("eval"):
        raise unknown_name_error("eval", ev.name, plugins("eval"))
    if ev.seqlen < 2:
        raise UserError(f"eval.seqlen={ev.seqlen}: a window needs at least 2 tokens (one to predict from, one to predict)")
    if ev.max_windows is not None and ev.max_windows < 1:
        raise UserError(f"eval.max_windows={ev.max_windows}: use a positive number, or null for every window")
    if cal.num_samples < 1:
        raise UserError(f"calib.num_samples={cal.num_samples}: calibration needs at least 1 sample")
    if cal.seqlen < 2:
        raise UserError(f"calib.seqlen={cal.seqlen}: a calibration sample needs at least 2 tokens")
    if kv.prefill == "full" and ev.name == "ppl":
        raise UserError("kv.prefill=full: perplexity scores the whole window in one prefill forward, so no token would "
                        "read quantized K/V (it would equal fp16); use kv.prefill=quantized, or a generation eval")
    if ev.name == "harness":
        if ev.limit is not None and ev.limit <= 0:
            raise UserError(f"eval.limit must be positive (< 1: a fraction of each task), got {ev.limit}")
        if ev.batch_size < 1:
            raise UserError(f"eval.batch_size must be at least 1, got {ev.batch_size}")
        if not ev.max_seq_lengths or min(ev.max_seq_lengths) < 256:
            raise UserError(f"eval.max_seq_lengths={list(ev.max_seq_lengths)}: RULER prompt lengths in tokens, each at least 256")


def check_output_dir(path: str) -> None:
    """``output_dir``, or the nearest folder above it that exists, takes a new file (nothing is left
    behind: a dry run creates no folders)."""
    root = Path(path).expanduser().absolute()
    while not root.exists() and root != root.parent:
        root = root.parent
    try:
        if not root.is_dir():
            raise NotADirectoryError(20, f"{root} is not a directory")
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".kvbench-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"output_dir={path} is not writable ({e.strerror or type(e).__name__})") from None


def check_shapes(cfg, info: "ModelInfo") -> None:
    """``kv.group_size`` against head_dim; ``eval.seqlen`` against the model's context."""
    g = cfg.kv.group_size
    if g is not None and (g <= 0 or info.head_dim % g):
        raise UserError(f"kv.group_size={g} does not divide head_dim={info.head_dim} of {info.name}")
    if cfg.eval.name == "ppl" and cfg.eval.seqlen > info.max_context:
        raise UserError(f"eval.seqlen={cfg.eval.seqlen} is longer than {info.name}'s context of {info.max_context}")


def check_data(cfg, method) -> "Optional[TextSplits]":
    """Read the data (one line for an unreadable, binary, non-UTF-8 or malformed file), split it,
    and count tokens with the tokenizer alone: one evaluation window (``eval=ppl``) and one
    calibration sample (a calibrating method) must fit. Hub datasets are read later (None)."""
    from kvbench.data import documents, load_splits
    from kvbench.eval.ppl import tokenize_prefix
    from kvbench.model import load_tokenizer

    docs = documents(cfg.data)
    if docs is None:
        return None
    where = f"data.path={cfg.data.path}" if cfg.data.source == "text" else f"data={cfg.data.name}"
    tok = load_tokenizer(cfg.model)
    if cfg.eval.name == "ppl":
        n = tokenize_prefix(tok, [t for _, t in docs], cfg.eval.seqlen).numel()
        if n < cfg.eval.seqlen:
            raise UserError(f"{where} has {n} tokens; one evaluation window needs eval.seqlen={cfg.eval.seqlen}")
    splits = load_splits(cfg.data, docs)
    if cfg.eval.name == "ppl":
        n = tokenize_prefix(tok, splits.eval, cfg.eval.seqlen).numel()
        if n < cfg.eval.seqlen:
            raise UserError(f"the evaluation part of {where} has {n} tokens; one window needs eval.seqlen={cfg.eval.seqlen} "
                            f"(lower eval.seqlen or add text)")
    if method.calibration_needs():
        need = cfg.calib.seqlen + 1
        n = tokenize_prefix(tok, splits.calib, need).numel()
        if n < need:
            raise UserError(f"the calibration part of {where} ({cfg.data.calib_fraction:g} of it) has {n} tokens; "
                            f"calib.seqlen={cfg.calib.seqlen} needs {need} (lower calib.seqlen or add text)")
    return splits


def check_task_names(names: list[str]) -> None:
    """Harness task names against kvbench's offline tasks and lm-eval's task index (the index is
    built once per lm-eval version and cached on disk: building it takes seconds)."""
    from kvbench.eval.harness import hub_offline, ruler_qa_refusal
    from kvbench.eval.tasks import OFFLINE_SUMMARY, OFFLINE_TASKS, RULER_QA
    from kvbench.registry import unknown_name_error

    if not names:
        raise UserError(f"eval=harness needs eval.tasks=[...]; offline tasks: {OFFLINE_SUMMARY}")
    for name in names:
        if name in RULER_QA and hub_offline():
            raise UserError(ruler_qa_refusal(name))
    if all(n in OFFLINE_TASKS for n in names):
        return
    known, hub = lm_eval_tasks()
    for name in names:
        if name in OFFLINE_TASKS:
            continue
        if name not in known:
            err = unknown_name_error("lm-eval task", name, OFFLINE_TASKS)
            raise UserError(f"{err} (offline; any lm-eval task name when the hub is reachable)")
        if name in hub and hub_offline():
            raise UserError(
                f"lm-eval task {name!r} needs the Hugging Face hub, which is offline here (HF_HUB_OFFLINE/"
                f"HF_DATASETS_OFFLINE; embedded models set them). Offline tasks: {OFFLINE_SUMMARY}")


def lm_eval_tasks() -> tuple[set, set]:
    """``(all task names, names whose data comes from the hub)`` of lm-eval's index, with kvbench's
    offline tasks; cached per lm-eval version in the kvbench cache."""
    import lm_eval

    from kvbench.eval.harness import _hub_tasks, task_manager
    from kvbench.local import cache_root
    from kvbench.tracking.store import atomic_write

    memo = cache_root() / f"lm_eval_tasks-{lm_eval.__version__}.json"
    try:
        d = json.loads(memo.read_text())
        return set(d["all"]), set(d["hub"])
    except (OSError, ValueError, KeyError):
        pass
    tm = task_manager(["\0index everything"])
    known, hub = set(tm.all_tasks), _hub_tasks(tm)
    try:
        atomic_write(memo, json.dumps({"all": sorted(known), "hub": sorted(hub)}))
    except OSError:
        pass
    return known, hub
