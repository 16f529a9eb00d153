"""The offline sweep runner: W&B sweep files expanded without a server, resumable, no duplicates."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from kvbench import sweep
from kvbench.tracking import store as results
from kvbench.config import conf_dir
from kvbench.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GRID_2X2 = """\
method: grid
metric: {name: ppl, goal: minimize}
parameters:
  method: {values: [fp16, uniform]}
  kv.bits: {values: [2, 4]}
command: ["${env}", "${interpreter}", "-m", "kvbench", "${args_no_hyphens}", "model=tiny-llama"]
"""


def write_corpus(path: Path) -> Path:
    """A small deterministic plain-text corpus (fast to tokenize, enough for 64-token windows)."""
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not this are or from at which".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)).capitalize() + "." for _ in range(60)))
    return path


def tiny(tmp_path: Path) -> list[str]:
    corpus = write_corpus(tmp_path / "corpus.txt")
    return ["data=text", f"data.path={corpus}", "eval.seqlen=64", "eval.max_windows=2",
            f"output_dir={tmp_path / 'out'}", "logging.wandb.mode=disabled", "logging.progress=false"]


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_files_validate(path):
    """Every file in sweeps/ is a valid W&B sweep whose runs all compose (as `wandb agent` would run them)."""
    spec = sweep.read_spec(path)
    planned = sweep.plan(spec, ["model=tiny-llama"], count=2 if spec["method"] == "random" else None, path=path)
    assert planned, f"{path} expands to no runs"
    groups = {d.name for d in Path(conf_dir()).iterdir() if d.is_dir()}
    for p in planned:
        for name, value in p.params.items():
            node = OmegaConf.select(p.cfg, name)
            if name in groups and not OmegaConf.is_dict(node):
                continue  # an overlay group (experiment=...): composing it was the check
            got = node.name if OmegaConf.is_dict(node) else node  # a config group (method=...) or a key
            assert got == value, f"{path}: run {p.overrides} composed {name}={got!r}, not {value!r}"


def test_bits_sweep_is_a_grid_over_method_and_bits():
    spec = sweep.read_spec(ROOT / "sweeps" / "bits.yaml")
    assert spec["method"] == "grid" and spec["metric"] == {"name": "ppl", "goal": "minimize"}
    assert set(spec["parameters"]) == {"method", "kv.bits"}
    assert spec["command"] == ["${env}", "${interpreter}", "-m", "kvbench", "${args_no_hyphens}"]
    planned = sweep.plan(spec, ["model=tiny-llama"])
    combos = {(p.cfg.method.name, p.cfg.kv.bits) for p in planned}
    assert combos == {(m, b) for m in spec["parameters"]["method"]["values"] for b in spec["parameters"]["kv.bits"]["values"]}


@pytest.mark.parametrize("macro", sweep.PARAM_MACROS)
def test_overrides_match_wandb_agent(macro):
    """The runner passes each run's parameters exactly as `wandb agent` builds its command line."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = {"command": ["${env}", "${interpreter}", "-m", "kvbench", macro]}
    params = {"kv.bits": {"value": 3}, "method": {"value": "uniform"}, "calib.fisher": {"value": False},
              "data.calib_fraction": {"value": 0.25}}
    assert sweep.param_overrides(spec, params) == create_sweep_command_args({"args": params})[macro[2:-1]]


def test_expand_grid_and_seeded_random(tmp_path):
    grid = yaml.safe_load(GRID_2X2)
    assert [sweep.param_overrides(grid, p) for p in sweep.expand(grid)] == [
        ["kv.bits=2", "method=fp16"], ["kv.bits=2", "method=uniform"], ["kv.bits=4", "method=fp16"], ["kv.bits=4", "method=uniform"]]
    rnd = dict(grid, method="random", parameters={"kv.bits": {"values": [2, 3, 4, 8]}, "seed": {"min": 0, "max": 1000}})
    a, b = sweep.expand(rnd, count=5, seed=1), sweep.expand(rnd, count=5, seed=1)
    assert a == b and len(a) == 5, "a random sweep must draw the same runs when restarted"
    assert a != sweep.expand(rnd, count=5, seed=2)
    with pytest.raises(UserError, match="--count"):
        sweep.expand(rnd)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("kv.bits:", "kv.bitz:"), r"kv\.bitz"),                  # unknown parameter key
    (lambda s: s.replace("[2, 4]", "[2, five]"), r"kv\.bits=five"),              # bad value (type)
    (lambda s: s.replace("[2, 4]", "[2, 5]"), r"kv\.bits=5 is not supported"),   # bad value (range)
    (lambda s: s.replace("[fp16, uniform]", "[fp16, unifrom]"), r"unifrom"),     # unknown method
    (lambda s: s.replace("method: grid", "method: bayes"), r"W&B server"),       # unsupported here
    (lambda s: s.replace("{values: [2, 4]}", "{min: 2.0, max: 4.0}"), r"grid sweep: .*disallowed type"),
    (lambda s: s.replace("method: grid", "method: hyperband"), r"not a valid W&B sweep"),
    (lambda s: s.replace('"${args_no_hyphens}"', '"${args}"'), r"Hydra overrides"),
    (lambda s: s.replace("values:", "valuez:"), r"not a valid W&B sweep"),
    (lambda s: s + "  oops: [\n", r"not valid YAML \(line"),
])
def test_malformed_sweep_is_one_clear_line(tmp_path, capsys, edit, message):
    path = write(tmp_path, edit(GRID_2X2))
    assert sweep.main([str(path), "--dry-run", *tiny(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvbench.sweep: error:"), err
    assert re.search(message, err[0]), err[0]


def test_dry_run_lists_runs_and_runs_nothing(tmp_path, capsys):
    path = write(tmp_path, GRID_2X2)
    assert sweep.main([str(path), "--dry-run", *tiny(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(" todo " in line for line in lines)
    assert "  kv.bits=2 method=fp16 model=tiny-llama data=text" in lines[0]
    assert not (tmp_path / "out").exists()


def _finished(out: Path) -> list[Path]:
    return sorted(out.glob("**/metrics.json"))


def test_killed_sweep_resumes_without_duplicates(tmp_path, capsys):
    """Kill the runner mid-sweep, restart it: the rest runs once; a third start runs nothing."""
    path = write(tmp_path, GRID_2X2)
    args = [str(path), *tiny(tmp_path)]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "kvbench.sweep", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not _finished(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_after = len(_finished(out))
    assert 1 <= killed_after < 4, f"the kill should land mid-sweep ({killed_after} runs finished)"

    assert sweep.main(args) == 0
    err = capsys.readouterr().err
    assert f"4 runs, {killed_after} done, {4 - killed_after} to run" in err
    assert f"{4 - killed_after} ran, {killed_after} skipped" in err
    mtimes = {p: p.stat().st_mtime_ns for p in _finished(out)}
    assert len(mtimes) == 4

    assert sweep.main(args) == 0
    assert "4 runs, 4 done, 0 to run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in _finished(out)} == mtimes, "a finished run was run again"

    assert not list(out.glob("**/*.lock")), "the runner's per-run locks are removed"
    frame = results.load(out)
    assert len(frame) == 4 and frame["run_id"].is_unique
    assert sorted(zip(frame["method.name"], frame["kv.bits"])) == [("fp16", 2), ("fp16", 4), ("uniform", 2), ("uniform", 4)]
    assert frame["metrics.ppl"].notna().all()


def test_run_held_by_another_runner_is_awaited(tmp_path, capsys):
    """Another runner holds two runs: this one runs the free ones first, then waits for those two; the
    one the other runner finishes is not run again, the one it gives up on is run here."""
    import threading

    planned = sweep.plan(yaml.safe_load(GRID_2X2), tiny(tmp_path))
    finished, abandoned = planned[0], planned[1]
    holding, release = threading.Event(), threading.Event()

    def other_runner():
        with results.run_lock(finished.out), results.run_lock(abandoned.out):
            holding.set()
            release.wait(120)
            results.save_run(finished.out, finished.cfg, {"ppl": 1.0, "by": "other"})

    other = threading.Thread(target=other_runner)
    other.start()
    holding.wait(60)
    threading.Timer(0.5, release.set).start()  # the other runner finishes while this one runs the free runs
    try:
        assert sweep.run_all(planned, progress=False) == {"ran": 3, "skipped": 1, "failed": 0}
    finally:
        release.set()
        other.join()
    err = capsys.readouterr().err
    assert err.count("being computed by another runner; waiting for it at the end") == 2
    assert results.existing_metrics(finished.out) == {"ppl": 1.0, "by": "other"}, "the other runner's run is kept"
    assert all(results.existing_metrics(p.out)["ppl"] > 1 for p in planned[1:]), "the rest ran here"
    assert not list((tmp_path / "out").glob("**/.*.lock"))


def test_two_runners_share_a_sweep_and_both_exit_0(tmp_path):
    """Two runners started together on one sweep: each run is computed (and logged to W&B) once, and
    both exit 0 since the sweep is done."""
    path = write(tmp_path, GRID_2X2)
    args = [str(path), *tiny(tmp_path), "logging.wandb.mode=offline"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    procs = [subprocess.Popen([sys.executable, "-m", "kvbench.sweep", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    ran = [int(re.search(r"kvbench.sweep: (\d+) ran, (\d+) skipped, 0 failed", err).group(1)) for _, err in outs]
    assert sum(ran) == 4, f"every run computed exactly once between the two runners ({ran})"
    runs = [m.parent for m in _finished(tmp_path / "out")]
    assert len(runs) == 4
    for run in runs:
        assert len(list((run / "wandb").glob("offline-run-*"))) == 1, f"{run} logged to W&B once"
    assert not list((tmp_path / "out").glob("**/.*.lock"))
