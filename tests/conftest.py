"""Shared fixtures: the tiny random model, the embedded model, and Hydra composition."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def _load(name: str):
    from kvbench.config import ModelConfig
    from kvbench.model import load_model

    return load_model(OmegaConf.structured(ModelConfig(name=name, embedded=name)))


@pytest.fixture(scope="session")
def tiny_model():
    """``(model, tokenizer, info)`` of the 2-layer random-weight Llama (GQA 4/2, RoPE), fp32."""
    return _load("tiny-llama")


@pytest.fixture(scope="session")
def embedded_model():
    """``(model, tokenizer, info)`` of the embedded SmolLM2-135M, fp32."""
    return _load("smollm2-135m")


@pytest.fixture(scope="session")
def wiki_splits():
    from kvbench.config import DataConfig
    from kvbench.data import load_splits

    return load_splits(OmegaConf.structured(DataConfig(name="wiki")))


def compose_config(overrides=()):
    """Compose the packaged Hydra config with ``overrides`` (as the command line would)."""
    from kvbench.config import compose

    return compose(overrides)


@pytest.fixture
def compose():
    return compose_config


def tokens(tok, text: str = "The quick brown fox jumps over the lazy dog. " * 8) -> torch.Tensor:
    return tok(text, return_tensors="pt").input_ids  # (1, T)


GENERATION_TASK_YAML = """
task: {name}
custom_dataset: !function {name}.load
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
"""
GENERATION_TASK_PY = """
import datasets

def load(**kwargs):
    rows = {{"prompt": {prompts!r}, "answer": {answers!r}}}
    return datasets.DatasetDict({{"test": datasets.Dataset.from_dict(rows)}})
"""


def write_generation_task(folder, name: str, prompts: list[str], answers: list[str], max_gen_toks: int) -> None:
    """A greedy lm-eval ``generate_until`` task ``name`` over ``prompts`` (exact match against ``answers``),
    written into ``folder`` for ``run_tasks(..., include_path=[folder])``."""
    (folder / f"{name}.yaml").write_text(GENERATION_TASK_YAML.format(name=name, max_gen_toks=max_gen_toks))
    (folder / f"{name}.py").write_text(GENERATION_TASK_PY.format(prompts=list(prompts), answers=list(answers)))
