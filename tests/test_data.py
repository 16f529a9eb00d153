"""Calibration and evaluation splits never overlap; user corpora work."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from kvbench.config import DataConfig
from kvbench.data import load_splits
from kvbench.errors import UserError


def test_embedded_split_is_disjoint_and_deterministic(wiki_splits):
    calib, ev = set(wiki_splits.calib), set(wiki_splits.eval)
    assert calib and ev and not calib & ev
    assert 0.05 < len(calib) / (len(calib) + len(ev)) < 0.15
    again = load_splits(OmegaConf.structured(DataConfig(name="wiki")))
    assert again.calib == wiki_splits.calib


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_user_corpus(tmp_path, suffix):
    paras = [f"Paragraph number {i} about something." for i in range(200)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(paras))
    else:
        path.write_text("\n".join(json.dumps({"text": p}) for p in paras))
    splits = load_splits(OmegaConf.structured(DataConfig(name="text", source="text", path=str(path))))
    assert sorted(splits.calib + splits.eval) == sorted(paras)
    assert not set(splits.calib) & set(splits.eval)


def test_missing_corpus_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a readable file"):
        load_splits(OmegaConf.structured(DataConfig(name="text", source="text", path=str(tmp_path / "nope.txt"))))


def test_hub_dataset_offline_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.structured(DataConfig(name="wikitext2", source="hf", hf_path="wikitext", hf_name="wikitext-2-raw-v1"))
    with pytest.raises(UserError, match="data=text data.path=FILE"):
        load_splits(cfg)
