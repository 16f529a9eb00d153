"""Every YAML under conf/ composes; typos and unknown names give one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvbench.config import check_overrides, conf_dir

CONF = Path(conf_dir())
YAMLS = sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml") if p.name != "config.yaml")


def _override(rel: Path) -> str:
    group = "/".join(rel.parent.parts)
    if rel.parts[0] == "experiment":  # an `optional experiment` default: select, don't append
        return f"experiment={rel.with_suffix('').relative_to('experiment').as_posix()}"
    if group.startswith("hydra"):
        return f"{group}={rel.stem}"
    return f"{group}={rel.stem}"


def test_yamls_found_recursively():
    groups = {p.parts[0] for p in YAMLS}
    assert {"model", "method", "kv", "data", "eval", "calib", "logging"} <= groups


@pytest.mark.parametrize("rel", YAMLS, ids=[str(p) for p in YAMLS])
def test_every_yaml_composes(rel, compose):
    extra = ["data.path=/tmp/x.txt"] if rel.stem == "text" else []
    cfg = compose([_override(rel), *extra])
    assert cfg.method.name and cfg.model.name


def test_design_card_command_line_composes(compose):
    cfg = compose(["model=opt-6.7b", "kv.bits=4"])
    assert cfg.model.hf_id == "facebook/opt-6.7b" and cfg.kv.bits == 4


@pytest.mark.parametrize(
    "args, expected",
    [
        (["method=unifrom"], "Unknown method 'unifrom'. Did you mean 'uniform'?"),
        (["model=smollm2"], "Unknown model 'smollm2'. Did you mean 'smollm2-135m'?"),
        (["data=wikitext"], "Unknown data 'wikitext'. Did you mean 'wikitext2'?"),
        (["kv.bitz=4"], "Unknown key 'kv.bitz'. Did you mean 'bits'? Valid keys of kv: bits, group_size, backend"),
        (["method=uniform", "method.key_axs=token"], "Did you mean 'key_axis'?"),
    ],
)
def test_unknown_names_and_keys(args, expected):
    assert expected in check_overrides(args)


def test_typed_schema_rejects_bad_type(compose):
    with pytest.raises(Exception, match="bits"):
        compose(["kv.bits=four"])


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvbench", "method=unifrom"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Did you mean 'uniform'" in proc.stderr
