"""Hydra multirun: a grid through the submitit launcher (local executor), and the launcher configs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvbench.tracking import store as results
from test_sweep import write_corpus


def test_submitit_local_multirun(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kvbench", "-m", "hydra/launcher=submitit_local", "method=fp16,uniform", "kv.bits=3",
           "model=tiny-llama", "data=text", f"data.path={corpus}", "eval.seqlen=64", "eval.max_windows=2",
           f"output_dir={out}", "logging.wandb.mode=disabled", "logging.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob(".multirun/*/.submitit/*/*_result.pkl"))) == 2, "both jobs ran through submitit"
    frame = results.load(out)
    assert sorted(frame["method.name"]) == ["fp16", "uniform"] and frame["run_id"].is_unique
    assert (frame["kv.bits"] == 3).all() and frame["metrics.ppl"].notna().all()


def _launcher(overrides):
    from hydra import compose, initialize_config_dir

    from kvbench.config import conf_dir, register_configs

    register_configs()  # the launcher lives in the Hydra part of the config, which compose() leaves out
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True).hydra.launcher


@pytest.mark.parametrize("name, target", [
    ("basic", "hydra._internal.core_plugins.basic_launcher.BasicLauncher"),
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launcher_configs(name, target):
    assert _launcher([f"hydra/launcher={name}"])._target_ == target


def test_slurm_launcher_defaults_and_overrides():
    slurm = _launcher(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30"])
    assert (slurm.partition, slurm.timeout_min, slurm.gpus_per_node, slurm.tasks_per_node) == ("gpu", 30, 1, 1)
    assert slurm.submitit_folder.startswith("outputs/.multirun/") and slurm.submitit_folder.endswith("/.submitit/%j")
