"""W&B logging, read back from the offline run files; the results frame from W&B has the local schema."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from omegaconf import OmegaConf

from kvbench.tracking import store as results

from kvbench.tracking import wandb as tracking
from kvbench.errors import UserError
from test_sweep import write_corpus


class FakeApi:
    """Stands in for ``wandb.Api()``: serves runs as the public API does (config and summary dicts)."""

    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None, order=None):
        self.calls.append((path, filters, order))
        return [SimpleNamespace(config=c, summary_metrics=s) for c, s in self._runs]


@pytest.fixture
def offline_run(compose, tmp_path):
    """One real kvbench run on the tiny model, logged to W&B offline."""
    from kvbench.run import run

    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = compose(["model=tiny-llama", "method=uniform", "kv.bits=3", "data=text", f"data.path={corpus}",
                   "eval.seqlen=64", "eval.max_windows=2", f"output_dir={tmp_path / 'out'}",
                   "logging.wandb.mode=offline", "logging.progress=false"])
    metrics = run(cfg)
    return cfg, metrics, results.run_dir(cfg)


def test_offline_run_holds_resolved_config_and_metrics(offline_run):
    cfg, metrics, out = offline_run
    [wandb_run] = tracking.offline_runs(out)
    back = tracking.read_offline_run(wandb_run, artifacts=True)
    assert back["state"] == "finished" and back["name"] == "uniform-3b-tiny-llama-text"
    assert back["project"] == "kvbench" and {"uniform", "3bit", "tiny-llama", "text", "ppl"} <= set(back["tags"])
    expected = results.flatten(OmegaConf.to_container(cfg, resolve=True))
    assert {k: back["config"][k] for k in expected} == expected, "the resolved config, every key, flattened"
    assert back["config"]["run_id"] == out.name and back["config"]["run_dir"] == str(out)
    for key, value in results.flatten(metrics).items():
        assert back["summary"][key] == pytest.approx(value), key
    assert back["summary"]["ppl"] == pytest.approx(json.loads((out / "metrics.json").read_text())["ppl"])
    assert {"ppl_info.context", "avg_bits", "kv_saving", "time.eval_s"} <= set(back["summary"])
    assert {"name": f"results-{out.name}", "type": "results", "metadata": {"run_dir": str(out)}} in back["artifacts"]

    # the frame from the W&B API (fed the run as read back) has the local frame's columns and values
    local = results.load(out.parents[2])
    api = FakeApi([(back["config"], back["summary"])])
    remote = results.load(wandb="me/kvbench", api=api)
    assert api.calls[0][1] == {"state": "finished"}
    assert sorted(remote.columns) == sorted(local.columns)
    pd.testing.assert_frame_equal(remote[local.columns], local, check_dtype=False)


def test_tables_and_artifacts(compose, tmp_path):
    cfg = compose(["model=tiny-llama", "method=uniform", f"output_dir={tmp_path}", "logging.wandb.mode=offline"])
    out = results.run_dir(cfg)
    metrics = {"ppl": 12.5, "tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.7}, "arc_easy": {"acc": 0.5}}}
    results.save_run(out, cfg, metrics)
    calib = tmp_path / "calib" / "abc123.safetensors"
    calib.parent.mkdir()
    calib.write_bytes(b"\0" * 64)
    calib.with_suffix(".json").write_text("{}")
    tracking.log_run(cfg, metrics, out, calibration=calib)
    back = tracking.read_offline_run(tracking.offline_runs(out)[0], artifacts=True)
    assert back["summary"]["tasks.piqa.acc_norm"] == 0.7 and back["summary"]["tasks.arc_easy.acc"] == 0.5
    table = back["summary"]["table/tasks"]
    assert (table["_type"], table["nrows"], table["ncols"]) == ("table-file", 2, 3)
    kinds = {a["type"]: a for a in back["artifacts"]}
    assert kinds["calibration"]["name"] == "calib-uniform-abc123"
    assert kinds["calibration"]["metadata"]["path"] == str(calib)
    assert kinds["results"]["name"] == f"results-{out.name}"


def test_metric_tables():
    assert tracking.metric_tables({"ppl": 3.0, "ppl_info": {"context": 64},
                                   "tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.7}, "arc_easy": {"acc": 0.5}}}) == {
        "tasks": (["tasks", "acc", "acc_norm"], [["piqa", 0.6, 0.7], ["arc_easy", 0.5, None]])}


def test_modes(compose, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    cfg = compose(["model=tiny-llama", f"output_dir={tmp_path}", "logging.wandb.mode=disabled"])
    assert tracking.log_run(cfg, {"ppl": 1.0}, tmp_path / "run") is None
    assert not list(tmp_path.glob("**/wandb"))
    cfg.logging.wandb.mode = "offline"
    (tmp_path / "run" / "wandb" / "offline-run-1").mkdir(parents=True)
    (tmp_path / "run" / "wandb" / tracking.MARKER).write_text('{"complete": true, "id": "1"}')
    assert tracking.log_run(cfg, {"ppl": 1.0}, tmp_path / "run", reused=True) is None, "a logged run is not re-logged"
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")
    assert tracking.wandb_mode(cfg) == "online", "a W&B agent's runs must reach its server"
    from kvbench.config import check_overrides  # the mode is an Enum: refused when composing

    assert check_overrides(["logging.wandb.mode=sometimes"]).startswith(
        "logging.wandb.mode=sometimes: expected one of offline, online, disabled")


def test_wandb_rows_one_per_run():
    cfg = {"method": "uniform", "method.name": "uniform", "kv": {"bits": 4}, "_wandb": {"x": 1}, "run_id": "a", "run_dir": "d/a"}
    summary = {"ppl": 9.0, "_runtime": 3, "table/tasks": {"_type": "table-file"}, "ppl_info": {"context": 64}}
    assert results.wandb_row(cfg, summary) == {"method.name": "uniform", "kv.bits": 4, "metrics.ppl": 9.0,
                                               "metrics.ppl_info.context": 64, "run_dir": "d/a", "run_id": "a",
                                               "results_version": 1}  # logged before versions were recorded: 1
    assert results.wandb_row({"lr": 0.1}, {"loss": 1.0}) is None, "runs not logged by kvbench are ignored"
    frame = results.load_wandb("me/kvbench", api=FakeApi([(cfg, {"ppl": 8.0}), (cfg, {"ppl": 9.0}), ({"lr": 1}, {})]))
    assert list(frame["metrics.ppl"]) == [8.0], "the newest W&B run of a results-store run wins"


def test_online_without_key_is_one_clear_line(compose, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no stored key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = compose(["model=tiny-llama", f"output_dir={tmp_path}", "logging.wandb.mode=online"])
    with pytest.raises(UserError, match=r"W&B online logging failed .*results are saved in .*mode=offline"):
        tracking.log_run(cfg, {"ppl": 1.0}, tmp_path / "run")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["init", "log_artifact"])
def test_interrupted_logging_is_relogged_on_reuse(compose, tmp_path, monkeypatch, where):
    """Ctrl-C while W&B starts (or logs) leaves a finished run whose W&B run is incomplete: reusing it
    logs it again, once, replacing the partial W&B files; the run itself is not recomputed."""
    import wandb

    from kvbench.run import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = compose(["model=tiny-llama", "method=uniform", "kv.bits=4", "data=text", f"data.path={corpus}",
                   "eval.seqlen=64", "eval.max_windows=1", f"output_dir={tmp_path / 'out'}",
                   "logging.wandb.mode=offline", "logging.progress=false"])
    out = results.run_dir(cfg)
    if where == "init":  # interrupted after W&B created its run folder, before init returned
        real_init = wandb.init

        def init(*args, **kwargs):
            (Path(kwargs["dir"]) / "wandb" / "offline-run-20000101_000000-partial" / "files").mkdir(parents=True)
            raise KeyboardInterrupt

        monkeypatch.setattr(wandb, "init", init)
    else:
        monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log_artifact", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert (out / "metrics.json").exists() and tracking.marker(out)["complete"] is False
    assert len(tracking.offline_runs(out)) == 1, "the interrupted attempt left a partial W&B run"
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)

    written = (out / "metrics.json").stat().st_mtime_ns
    metrics = run(cfg)
    assert (out / "metrics.json").stat().st_mtime_ns == written, "reused, not recomputed"
    [logged] = tracking.offline_runs(out)
    done = tracking.marker(out)
    assert done["complete"] is True and logged.name.endswith(f"-{done['id']}")
    back = tracking.read_offline_run(logged, artifacts=True)
    assert back["state"] == "finished" and back["summary"]["ppl"] == pytest.approx(metrics["ppl"])
    assert {"name": f"results-{out.name}", "type": "results", "metadata": {"run_dir": str(out)}} in back["artifacts"]

    run(cfg)
    assert tracking.offline_runs(out) == [logged] and tracking.marker(out) == done, "a complete W&B run is not re-logged"
