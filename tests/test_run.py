"""End-to-end runs: results are recorded once and never overwritten; bad input is one clear line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from kvbench.tracking import store as results
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


def test_triton_kernels_without_gpu_is_one_clear_error(tmp_path):
    """``kv.kernel.impl=triton`` on a CPU without the interpreter fails in one line (``auto`` would take the
    reference twins there)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kvbench", *TINY, f"output_dir={tmp_path}", "kv.backend=kernel",
                           "kv.kernel.impl=triton", *KERNEL], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kvbench: error: kv.backend=kernel needs a CUDA GPU with Triton") and "kv.kernel.impl=reference" in last


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
    assert frame.loc["kernel", "metrics.kv_bytes_per_token"] == frame.loc["kernel", "metrics.kv_memory.bytes_per_token"]
    assert frame.loc["kernel", "metrics.kv_format"] == "k-channel"  # no GPU, no benchmark record of this shape:
    assert frame.loc["kernel", "metrics.decode_us_source"].startswith("none: not on a GPU")  # says so


def _corpus(path, word: str) -> None:
    path.write_text("\n\n".join(f"Paragraph {i}: the {word} sat on a mat near window {i}." for i in range(300)))


def test_identity_by_content(compose, tmp_path, capsys):
    """An edited data file or edited local weights recompute; an unchanged run is reused and names
    the commit it was made at; rerun=true recomputes into the same directory."""
    from safetensors.torch import load_file, save_file

    from kvbench.model import embedded_model_path
    from kvbench.run import run

    corpus = tmp_path / "corpus.txt"
    _corpus(corpus, "cat")
    weights = tmp_path / "weights"  # a local model.path folder: the tiny model's files
    import shutil

    shutil.copytree(embedded_model_path("tiny-llama"), weights)
    args = [*TINY, "method=uniform", f"output_dir={tmp_path / 'out'}", "data=text", f"data.path={corpus}",
            "model.embedded=null", f"model.path={weights}"]
    first = run(compose(args))
    out1 = results.run_dir(compose(args))
    inputs = json.loads((out1 / "inputs.json").read_text())
    assert inputs["data"]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert inputs["model"]["files"]["model.safetensors"] == hashlib.sha256((weights / "model.safetensors").read_bytes()).hexdigest()

    capsys.readouterr()
    assert run(compose(args)) == first
    commit = json.loads((out1 / "env.json").read_text())["git_commit"]
    assert f"already finished at commit {commit}, reusing {out1}" in capsys.readouterr().err

    mtime = (out1 / "metrics.json").stat().st_mtime_ns
    again = run(compose([*args, "rerun=true"]))
    assert results.run_dir(compose([*args, "rerun=true"])) == out1 and (out1 / "metrics.json").stat().st_mtime_ns != mtime
    assert again["ppl"] == pytest.approx(first["ppl"], rel=1e-6)

    _corpus(corpus, "dog")  # same path, new content
    edited_data = run(compose(args))
    out2 = results.run_dir(compose(args))
    assert out2 != out1 and edited_data["ppl"] != first["ppl"]

    tensors = load_file(weights / "model.safetensors")
    name = next(k for k in sorted(tensors) if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 2
    save_file(tensors, weights / "model.safetensors", metadata={"format": "pt"})
    edited_weights = run(compose(args))
    out3 = results.run_dir(compose(args))
    assert out3 not in (out1, out2) and edited_weights["ppl"] != edited_data["ppl"]
    assert len(results.load(tmp_path / "out")) == 3
