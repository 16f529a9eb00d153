"""End-to-end runs: results are recorded once and never overwritten; bad input is one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvbench import results
from kvbench.errors import UserError

TINY = ["model=tiny-llama", "eval.seqlen=64", "eval.max_windows=2", "logging.wandb.mode=disabled", "logging.progress=false"]


def test_run_records_and_reuses(compose, tmp_path):
    from kvbench.run import run

    cfg = compose([*TINY, "method=uniform", "kv.bits=4", f"output_dir={tmp_path}"])
    first = run(cfg)
    path = results.run_dir(cfg)
    mtime = (path / "metrics.json").stat().st_mtime_ns
    assert (path / "config.yaml").exists() and (path / "env.json").exists()
    assert first["ppl_info"] == {"kind": "token", "context": 64, "tokens": 126, "windows": 2}
    second = run(cfg)
    assert second == json.loads((path / "metrics.json").read_text())
    assert (path / "metrics.json").stat().st_mtime_ns == mtime
    other = compose([*TINY, "method=uniform", "kv.bits=3", f"output_dir={tmp_path}"])
    run(other)
    assert results.run_dir(other) != path
    assert len(results.load(tmp_path)) == 2


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        results.atomic_write(tmp_path / "metrics.json", "{}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["kv.bits=5"], "kv.bits=5 is not supported"),
        (["kv.group_size=7"], "kv.group_size=7 does not divide head_dim=16"),
        (["eval.seqlen=100000"], "longer than tiny-llama's context of 8192"),
    ],
)
def test_bad_values(compose, tmp_path, overrides, message):
    from kvbench.run import run

    cfg = compose([*TINY, "method=uniform", f"output_dir={tmp_path}", *overrides])
    with pytest.raises(UserError, match=message):
        run(cfg)
    assert not list(tmp_path.rglob("metrics.json"))


def test_corrupt_model_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    proc = subprocess.run(
        [sys.executable, "-m", "kvbench", f"model.path={tmp_path}", f"output_dir={tmp_path / 'out'}", "logging.wandb.mode=disabled"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kvbench: error: cannot") and str(tmp_path) in last


def _cli(tmp_path, *overrides, env=None):
    return subprocess.run(
        [sys.executable, "-m", "kvbench", *TINY, f"output_dir={tmp_path}", *overrides],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **(env or {})},
    )


KERNEL = ["method=uniform", "method.key_axis=channel", "method.key_block=16", "eval.max_windows=1"]


def test_kernel_backend_without_gpu_is_one_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kvbench", *TINY, f"output_dir={tmp_path}", "kv.backend=kernel", *KERNEL],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "kvbench: error: kv.backend=kernel needs a CUDA GPU with Triton, or TRITON_INTERPRET=1 for the (slow) interpreter")


def test_kernel_backend_matches_simulated(tmp_path):
    """The packed cache + Triton kernels (interpreted on CPU) give the simulated perplexity, and
    the run logs memory measured from the cache's real tensors."""
    kernel = _cli(tmp_path, "kv.backend=kernel", *KERNEL, env={"TRITON_INTERPRET": "1"})
    assert kernel.returncode == 0, kernel.stderr[-2000:]
    simulated = _cli(tmp_path, *KERNEL)
    assert simulated.returncode == 0, simulated.stderr[-2000:]
    frame = results.load(tmp_path).set_index("kv.backend")
    assert frame.loc["kernel", "metrics.ppl"] == pytest.approx(frame.loc["simulated", "metrics.ppl"], rel=1e-3)
    assert frame.loc["kernel", "metrics.kv_memory.bytes_per_token"] > 0
