"""Nothing computed twice, nothing lost: identical runs started together, the per-run lock, file modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading

import pytest
import torch

from kvbench.tracking import store as results

from kvbench.tracking import wandb as tracking
from test_sweep import write_corpus


def test_identical_runs_started_together_compute_once(tmp_path):
    """Two identical `python -m kvbench` runs at once: one computes and logs, the other waits and reuses."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kvbench", "model=tiny-llama", "method=uniform", "kv.bits=3", "data=text",
           f"data.path={corpus}", "eval.seqlen=64", "eval.max_windows=2", f"output_dir={out}",
           "logging.wandb.mode=offline", "logging.progress=false"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for _ in range(2)]
    outs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    reused = ["identical run already finished" in err and "reusing" in err for _, err in outs]
    assert sorted(reused) == [False, True], "exactly one process computed"
    [run] = [m.parent for m in out.glob("**/metrics.json")]
    [logged] = tracking.offline_runs(run)
    assert tracking.marker(run)["complete"] and logged.name.endswith(tracking.marker(run)["id"])
    printed = [next(line for line in o.splitlines() if line.startswith("kvbench |")) for o, _ in outs]
    assert printed[0] == printed[1], "both print the one result"
    assert not list(out.glob("**/.*.lock"))


def test_run_lock_excludes_and_waits(tmp_path, capsys):
    """Threads (as processes) contend for one run, arriving while others wait and while holders let go
    (and remove the lock file): one holds it at a time, and every one gets it in the end."""
    out = tmp_path / "exp" / "method" / "abc"
    inside, order = [], []

    def worker(i):
        threading.Event().wait(0.013 * i)
        with results.run_lock(out):
            inside.append(i)
            order.append(len(inside))  # how many held it at once
            threading.Event().wait(0.02)
            inside.remove(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == [1] * 24
    assert "is being computed by another process; waiting for it" in capsys.readouterr().err

    with results.run_lock(out):
        with results.run_lock(out):  # re-entrant in one thread (the sweep runner around run())
            assert results.lock_path(out).exists()
        busy = []
        t = threading.Thread(target=lambda: busy.append(pytest.raises(results.RunBusy, results.run_lock(out, wait=False).__enter__)))
        t.start()
        t.join()
        assert busy, "another thread is refused without waiting"
    assert not results.lock_path(out).exists(), "the holder removes the lock file"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_honour_the_umask(tmp_path, umask):
    """Result files and calibration artifacts get ``0o666 & ~umask``, as files made by ``open()``."""
    from kvbench.calibration import load_artifact, save_artifact

    old = os.umask(umask)
    try:
        reference = tmp_path / "reference"
        reference.write_text("x")  # what the OS gives a plain new file
        results.atomic_write(tmp_path / "metrics.json", json.dumps({"ppl": 1.0}))
        artifact = tmp_path / "calib" / "key.safetensors"
        artifact.parent.mkdir()
        tensors = {"scale": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
        save_artifact(artifact, "key", {"method": "test"}, tensors)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(reference.stat().st_mode) == expected
    for f in (tmp_path / "metrics.json", artifact, artifact.with_suffix(".json")):
        assert stat.S_IMODE(f.stat().st_mode) == expected, f"{f.name}: {oct(stat.S_IMODE(f.stat().st_mode))}"
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"ppl": 1.0}
    assert torch.equal(load_artifact(artifact, "key")["scale"], tensors["scale"])
    assert not list(tmp_path.glob("**/.*tmp")), "no temporary file left"
