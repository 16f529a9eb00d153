"""lm-eval-harness on the patched model: offline suite, quantized scoring and decoding, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_generation_task

GOLDEN = Path(__file__).parent / "golden" / "harness.json"  # made by tests/golden/make_harness.py

# Offline task -> the standard lm-eval YAML it must reproduce (prompt, target, choices, metrics).
STANDARD = {
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "copa": "super_glue/copa/default.yaml",
    "sciq": "sciq/sciq.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
    "gsm8k_cot": "gsm8k/gsm8k-cot.yaml",
}
SIZES = {"piqa": 1838, "hellaswag": 10042, "arc_easy": 570, "arc_challenge": 299, "winogrande": 1267, "boolq": 3270,
         "openbookqa": 500, "copa": 100, "sciq": 1000, "lambada_openai": 5153, "gsm8k": 1319, "gsm8k_cot": 1319}
RULER = {"niah_single_1": "niah_single_1", "niah_single_2": "niah_single_2", "niah_single_3": "niah_single_3",
         "niah_multikey_1": "niah_multikey_1", "niah_multikey_2": "niah_multikey_2", "niah_multikey_3": "niah_multikey_3",
         "niah_multivalue": "niah_multivalue", "niah_multiquery": "niah_multiquery", "ruler_vt": "vt", "ruler_cwe": "cwe",
         "ruler_fwe": "fwe"}


def _method(compose, info, *overrides):
    from kvbench.run import build_method

    cfg = compose(["model=tiny-llama", *overrides])
    return build_method(cfg, info)


def _lls(results, task):
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in samples])  # (docs, choices)


def test_offline_suite_reproduces_standard_definitions():
    """Every offline task gives the same prompts, targets and choices as lm-eval's own YAML fed the same docs."""
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import get_task_dict
    from lm_eval.tasks._yaml_loader import load_yaml

    from kvbench.eval.harness import task_manager
    from kvbench.eval.tasks import OFFLINE_TASKS

    mmlu = {n for n in OFFLINE_TASKS if n.startswith("mmlu")}
    assert set(OFFLINE_TASKS) == set(STANDARD) | set(RULER) | mmlu | {"ruler_niah"} and len(mmlu) == 57 + 5
    ours = get_task_dict(list(STANDARD), task_manager(STANDARD))
    std_dir = Path(lm_eval.tasks.__file__).parent
    for name, rel in STANDARD.items():
        task = ours[name]
        assert len(task.eval_docs) == SIZES[name], name
        std = load_yaml(std_dir / rel)
        for key in ("dataset_path", "dataset_name", "tag", "training_split", "fewshot_split"):
            std.pop(key, None)
        std.update(custom_dataset=task.config.custom_dataset, validation_split=task.config.validation_split,
                   test_split=task.config.test_split)
        ref = ConfigurableTask(config=std)
        _same_task(task, ref, name)


def _same_task(task, ref, name, docs=None):
    """Prompts, targets, choices, metrics, filters and generation settings of two lm-eval tasks on the same docs."""
    assert ref.OUTPUT_TYPE == task.OUTPUT_TYPE, name
    assert [m["metric"] for m in ref.config.metric_list] == [m["metric"] for m in task.config.metric_list], name
    for key in ("generation_kwargs", "filter_list", "num_fewshot", "description", "target_delimiter", "fewshot_delimiter",
                "gen_prefix", "process_results", "repeats"):
        assert getattr(ref.config, key) == getattr(task.config, key), (name, key)
    n = len(task.eval_docs)
    for i in docs or (0, 1, n - 1):
        doc, ref_doc = task.eval_docs[i], ref.eval_docs[i]
        assert task.doc_to_text(doc) == ref.doc_to_text(ref_doc), name
        assert task.doc_to_target(doc) == ref.doc_to_target(ref_doc), name
        if task.OUTPUT_TYPE == "multiple_choice":
            assert task.doc_to_choice(doc) == ref.doc_to_choice(ref_doc), name
        if task.config.num_fewshot and getattr(task.config.fewshot_config, "sampler", None) == "first_n":  # fixed shots
            assert task.fewshot_context(doc, task.config.num_fewshot) == ref.fewshot_context(ref_doc, task.config.num_fewshot), name


def test_offline_mmlu_reproduces_standard_definitions():
    """Every MMLU subject (and group) is lm-eval's own ``mmlu/default`` YAML with the package's test/dev data;
    the 5-shot prompt (dev split, first_n) is compared too."""
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import get_task_dict
    from lm_eval.tasks._yaml_loader import load_yaml

    from kvbench.eval.harness import task_manager

    std_dir = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"
    subjects = sorted(p.stem for p in std_dir.glob("mmlu_*.yaml"))
    assert len(subjects) == 57
    ours = get_task_dict(subjects, task_manager(subjects))
    total = 0
    for name in subjects:
        task = ours[name]
        std = load_yaml(std_dir / f"{name}.yaml")
        for key in ("dataset_path", "dataset_name", "tag"):
            std.pop(key, None)
        std["custom_dataset"] = task.config.custom_dataset
        std["dataset_kwargs"] = task.config.dataset_kwargs
        ref = ConfigurableTask(config=std)
        _same_task(task, ref, name)
        doc = task.eval_docs[0]
        assert task.fewshot_context(doc, 5) == ref.fewshot_context(ref.eval_docs[0], 5), name
        total += len(task.eval_docs)
    assert total == 14042  # MMLU's test set
    tm = task_manager(["mmlu"])
    for group in ("mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"):
        assert group in tm.all_groups


def test_offline_ruler_reproduces_lm_eval_generators(monkeypatch):
    """Each RULER task equals lm-eval's own YAML and generator on the same haystack, lengths and tokenizer: the
    essay tasks are lm-eval's generator with the embedded Wikipedia text in place of the essays."""
    import random

    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import get_task_dict
    from lm_eval.tasks._yaml_loader import load_yaml

    from kvbench.config import compose
    from kvbench.eval.harness import task_manager, task_metadata
    from kvbench.eval.tasks import offline
    from kvbench.model import load_tokenizer

    offline._punkt_tab()
    import datasets
    from lm_eval.tasks.ruler import prepare_niah

    tok = load_tokenizer(compose(["model=smollm2-135m"]).model)  # the embedded model's own tokenizer (no weights)
    meta = task_metadata(tok, [1024])
    essays = {"text": [" ".join(offline.wiki_haystack())]}  # what lm-eval's get_haystack("essay") reads, offline
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: essays if path == "baber/paul_graham_essays" else 1 / 0)
    prepare_niah.get_haystack.cache_clear()
    std_dir = Path(lm_eval.tasks.__file__).parent / "ruler"
    tm = task_manager(list(RULER), metadata=meta)
    for name, stem in RULER.items():
        random.seed(0)
        task = get_task_dict([name], tm)[name]
        std = load_yaml(std_dir / f"{stem}.yaml")
        std.pop("tag", None)
        std["metadata"] = {**std.get("metadata", {}), **meta}
        random.seed(0)
        ref = ConfigurableTask(config=std)  # lm-eval's own custom_dataset (its niah_utils with the haystack above)
        assert len(task.eval_docs) == len(ref.eval_docs) == 500, name
        if name.startswith("ruler_"):  # lm-eval's own generator (module-level RNGs: a second call gives other docs)
            ours_fn, ref_fn = task.config.custom_dataset, ref.config.custom_dataset
            assert (ours_fn.__code__.co_filename, ours_fn.__name__) == (ref_fn.__code__.co_filename, ref_fn.__name__)
        else:
            assert task.eval_docs["input"] == ref.eval_docs["input"], name
        assert set(task.eval_docs["max_length"]) == {1024}, name  # lm-eval's FWE may overshoot it a little (its sizing)
        ours_metrics = [m["metric"] for m in task.config.metric_list]
        assert ours_metrics[:2] == ["1024", "2048"] and ours_metrics[2:] == [m["metric"] for m in ref.config.metric_list]
        ref.config.metric_list = task.config.metric_list
        for key in ("generation_kwargs", "target_delimiter", "gen_prefix", "repeats"):
            assert getattr(ref.config, key) == getattr(task.config, key), (name, key)
        for i in (0, 499):
            assert task.doc_to_text(task.eval_docs[i]) == ref.doc_to_text(task.eval_docs[i]), name
            assert task.doc_to_target(task.eval_docs[i]) == ref.doc_to_target(task.eval_docs[i]), name
    prepare_niah.get_haystack.cache_clear()  # the stand-in essays must not outlive this test


def test_task_yamls_work_from_any_cwd(tmp_path, monkeypatch):
    from lm_eval.tasks import get_task_dict

    from kvbench.eval.harness import task_manager

    monkeypatch.chdir(tmp_path)
    task = get_task_dict(["copa"], task_manager(["copa"]))["copa"]
    assert task.doc_to_text(task.eval_docs[0]) == "The man turned on the faucet therefore"


@pytest.mark.slow
def test_golden_fp16_embedded(embedded_model):
    """fp16 accuracies and log-likelihoods of SmolLM2 on two offline tasks (limit 8) match the golden file."""
    import sys

    sys.path.insert(0, str(GOLDEN.parent))
    from make_harness import golden

    ref = json.loads(GOLDEN.read_text())["results"]
    model, tok, _ = embedded_model
    got = golden(model, tok)
    for task, r in ref.items():
        assert got[task]["n"] == r["n"]
        assert got[task]["acc"] == pytest.approx(r["acc"], abs=1e-9), task
        assert got[task]["acc_norm"] == pytest.approx(r["acc_norm"], abs=1e-9), task
        diff = (torch.tensor(got[task]["loglikelihoods"]) - torch.tensor(r["loglikelihoods"])).abs()
        assert diff.max() < 1e-3, f"{task}: max |dll| {diff.max():.2e}, mean {diff.mean():.2e}"


def test_int2_changes_loglikelihoods(tiny_model, compose):
    """Scoring goes through the quantizing cache: int2 moves every log-likelihood, int8 barely."""
    from kvbench.eval.harness import run_tasks
    from kvbench.cache import patched

    model, tok, info = tiny_model
    lls = {}
    for name, overrides in {"fp16": ["method=fp16"], "int8": ["method=uniform", "kv.bits=8"],
                            "int2": ["method=uniform", "kv.bits=2"]}.items():
        with patched(model, _method(compose, info, *overrides)):
            lls[name] = _lls(run_tasks(model, tok, ["piqa"], limit=4, log_samples=True), "piqa")
    d2 = (lls["int2"] - lls["fp16"]).abs()
    d8 = (lls["int8"] - lls["fp16"]).abs()
    assert d2.min() > 1e-3, f"int2 left a log-likelihood unchanged: {d2}"
    assert d8.max() < d2.min(), f"int8 {d8.max():.3e} vs int2 {d2.min():.3e}"


def test_generation_task_decodes_through_quantizing_cache(tiny_model, compose, tmp_path):
    """An lm-eval generate_until task: prefill and every decode step use one QuantizingCache whose K/V are int2."""
    from kvbench.eval.harness import per_task, run_tasks
    from kvbench.cache import QuantizingCache, patched

    write_generation_task(tmp_path, "kvbench_probe_gen", ["The capital of France is", "One, two, three, four,"],
                          [" Paris", " five"], max_gen_toks=5)
    model, tok, info = tiny_model
    calls = []  # (new tokens, cache) of every forward

    def spy(module, args, kwargs, out):
        calls.append((kwargs["input_ids"].shape[1], out.past_key_values))

    handle = model.register_forward_hook(spy, with_kwargs=True)
    try:
        with patched(model, _method(compose, info, "method=uniform", "kv.bits=2")):
            res = run_tasks(model, tok, ["kvbench_probe_gen"], include_path=[tmp_path], log_samples=True)
    finally:
        handle.remove()
    assert per_task(res)["kvbench_probe_gen"]["n"] == 2
    assert len(res["samples"]["kvbench_probe_gen"][0]["resps"][0][0]) > 0  # something was generated
    caches = {id(c): c for _, c in calls}
    assert all(isinstance(c, QuantizingCache) for c in caches.values())
    assert len(caches) == 2  # one cache per generated document, reused by its decode steps
    for key in caches:  # the prefill and at least one one-token decode step per document
        steps = [n for n, c in calls if id(c) == key]
        assert steps[0] > 1 and steps[1:] and all(n == 1 for n in steps[1:]), steps
    for cache in caches.values():
        for layer in cache.layers:
            T = layer.keys.shape[-2]
            assert layer.n_final == T and layer.n_quantized == T  # no sink / recent window: every token quantized
            for x in (layer.keys, layer.values):  # (B, H_kv, T, D), per-token int2: <= 4 levels per token and head
                rows = x.reshape(-1, x.shape[-1])
                levels = torch.tensor([r.unique().numel() for r in rows])
                assert levels.max() <= 4 and x.shape[-1] > 4


@pytest.fixture(scope="module")
def small_tm():
    """The offline suite plus one hub task folder of lm-eval (indexing all of lm-eval takes tens of seconds)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    from kvbench.eval.tasks import TASK_DIR

    hub = Path(lm_eval.tasks.__file__).parent / "mathqa"
    return TaskManager(include_path=[str(hub), str(TASK_DIR)], include_defaults=False)


def test_task_manager_indexes_hub_tasks_only_when_asked(monkeypatch):
    import lm_eval.tasks

    from kvbench.eval.harness import task_manager

    calls = []

    class Spy(lm_eval.tasks.TaskManager):
        def __init__(self, include_path=None, include_defaults=True, **kwargs):
            calls.append(include_defaults)
            super().__init__(include_path=include_path, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Spy)
    tm = task_manager(["piqa", "lambada_openai"])
    assert calls == [False] and str(tm._index["piqa"].yaml_path).endswith("kvbench/eval/tasks/piqa.yaml")
    task_manager(["mathqa"])
    assert calls == [False, False, True]  # a name outside the offline suite: lm-eval's own tasks are indexed


def test_unknown_task_names_the_offline_list(small_tm):
    from kvbench.errors import UserError
    from kvbench.eval.harness import check_tasks

    with pytest.raises(UserError, match=r"Unknown lm-eval task 'hellaswagg'.*Did you mean 'hellaswag'.*lambada_openai"):
        check_tasks(["piqa", "hellaswagg"], small_tm)
    with pytest.raises(UserError, match="eval.tasks"):
        check_tasks([], small_tm)


def test_hub_task_while_offline_is_a_clear_error(small_tm, monkeypatch):
    from kvbench.errors import UserError
    from kvbench.eval.harness import check_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match=r"'mathqa' needs the Hugging Face hub.*Offline tasks: arc_challenge"):
        check_tasks(["piqa", "mathqa"], small_tm)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_tasks(["piqa", "mathqa"], small_tm)  # hub allowed: the name passes to lm-eval unchanged


def test_cli_run_records_per_task_metrics(compose, tmp_path):
    """``eval=harness`` end to end: per-task metrics with stderr in metrics.json and the results frame."""
    from kvbench.tracking import store as results
    from kvbench.run import run

    cfg = compose(["model=tiny-llama", "method=uniform", "kv.bits=4", "eval=harness", "eval.tasks=[copa,lambada_openai]",
                   "eval.limit=3", f"output_dir={tmp_path}", "logging.wandb.mode=disabled", "logging.progress=false"])
    metrics = run(cfg)
    assert set(metrics["tasks"]) == {"copa", "lambada_openai"}
    copa = metrics["tasks"]["copa"]
    assert copa["n"] == 3 and copa["n_total"] == 100 and 0 <= copa["acc"] <= 1 and copa["acc_stderr"] > 0
    assert metrics["tasks"]["lambada_openai"]["perplexity"] > 1
    frame = results.load(tmp_path)
    assert frame.loc[0, "metrics.tasks.copa.acc"] == copa["acc"]
    assert frame.loc[0, "metrics.harness_info.limit"] == 3


def test_ruler_qa_is_refused_before_the_model_loads(compose, monkeypatch, tmp_path):
    """RULER's QA tasks need SQuAD v2 / HotpotQA from the hub: one line at validation, before any weights load."""
    from kvbench.errors import UserError
    from kvbench.validate import check

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = compose(["model=tiny-llama", "eval=harness", "eval.tasks=[niah_single_1,ruler_qa_squad]", f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"^lm-eval task 'ruler_qa_squad': RULER's QA tasks read SQuAD v2 / HotpotQA[^\n]*$"):
        check(cfg)


def test_harness_options_reach_lm_eval_and_the_run_hash(compose, monkeypatch):
    """eval.chat_template / system_instruction / max_seq_lengths go to lm-eval (chat template: the model's default
    when null) and change the run hash; at their defaults the hash is the one of runs made before they existed."""
    from kvbench.eval import harness
    from kvbench.tracking.store import config_hash

    seen = {}
    monkeypatch.setattr(harness, "run_tasks", lambda model, tok, tasks, **kw: seen.update(kw) or {"results": {}})

    class Tok:
        name_or_path = "/models/tok"

    base = ["model=tiny-llama", "eval=harness", "eval.tasks=[niah_single_1]"]
    harness.evaluate(compose(base), None, Tok(), None, None)
    assert seen["chat_template"] is False and seen["system_instruction"] is None and seen["num_fewshot"] is None
    assert seen["metadata"] == {"tokenizer": "/models/tok", "max_seq_lengths": [4096], "haystack": "wiki"}
    harness.evaluate(compose(base + ["model.chat_template=true", "eval.max_seq_lengths=[1024,2048]"]), None, Tok(), None, None)
    assert seen["chat_template"] is True and seen["metadata"]["max_seq_lengths"] == [1024, 2048]
    harness.evaluate(compose(base + ["model.chat_template=true", "eval.chat_template=false",
                                     "eval.system_instruction='Answer briefly.'"]), None, Tok(), None, None)
    assert seen["chat_template"] is False and seen["system_instruction"] == "Answer briefly."

    fp = {"data": {}, "model": {}}
    h0 = config_hash(compose(base), fp)
    for extra in (["eval.chat_template=true"], ["model.chat_template=true"], ["eval.system_instruction=x"],
                  ["eval.max_seq_lengths=[8192]"], ["eval.ruler_haystack=essay"]):
        assert config_hash(compose(base + extra), fp) != h0, extra
    cfg = compose(base)
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(cfg, resolve=True)  # the config as stored before these options existed
    for key in ("max_seq_lengths", "ruler_haystack", "chat_template", "system_instruction"):
        old["eval"].pop(key)
    old["model"].pop("chat_template")
    assert config_hash(OmegaConf.create(old), fp) == h0


def test_ruler_family_runs_through_the_quantizing_cache(tiny_model, compose):
    """RULER's retrieval family (``ruler_niah``, 8 tasks) on the tiny model at 1024 tokens: lm-eval generates,
    scores and averages its tasks; lengths that were not run (lm-eval's -1) are left out of the results."""
    from kvbench.cache import patched
    from kvbench.eval.harness import per_task, run_tasks, task_metadata

    model, tok, info = tiny_model
    with patched(model, _method(compose, info, "method=uniform", "kv.bits=2")):
        res = run_tasks(model, tok, ["ruler_niah"], limit=1, metadata=task_metadata(tok, [1024]))
    rows = per_task(res)
    assert set(rows) == {"ruler_niah"} | {n for n in RULER if n.startswith("niah_")}
    for row in rows.values():
        assert 0 <= row["1024"] <= 1 and "4096" not in row
    assert rows["ruler_niah"]["1024"] == pytest.approx(sum(r["1024"] for n, r in rows.items() if n != "ruler_niah") / 8)


def test_ruler_lengths_beyond_the_context_are_refused(compose, tmp_path):
    from kvbench.errors import UserError
    from kvbench.validate import check

    cfg = compose(["model=smollm2-135m", "eval=harness", "eval.tasks=[niah_single_1]", "eval.max_seq_lengths=[4096,16384]",
                   f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"niah_single_1 prompts of 16384 tokens exceed smollm2-135m's context of 8192"):
        check(cfg)


def test_chat_template_and_system_prompt_reach_the_prompts(tiny_model):
    """``chat_template=True`` formats every request with the tokenizer's template (SmolLM2's ChatML), the system
    instruction first; without it the prompt is lm-eval's plain text."""
    from kvbench.eval.harness import run_tasks

    model, tok, _ = tiny_model
    plain = run_tasks(model, tok, ["copa"], limit=1, log_samples=True)["samples"]["copa"][0]["arguments"]
    chat = run_tasks(model, tok, ["copa"], limit=1, log_samples=True, chat_template=True,
                     system_instruction="Answer briefly.")["samples"]["copa"][0]["arguments"]
    context = lambda args: (args[0][0] if isinstance(args[0], (list, tuple)) else args["gen_args_0"]["arg_0"])
    assert context(plain) == "The man turned on the faucet therefore"
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "The man turned on the faucet therefore"}],
        tokenize=False, add_generation_prompt=True)
    assert context(chat) == expected and expected.startswith("<|im_start|>system\nAnswer briefly.")
