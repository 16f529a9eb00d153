"""Bad input fails fast: one line, exit 2, no traceback, no weights loaded; artifacts are checked
against what the configuration expects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from kvbench.errors import UserError

BASE = ["model=tiny-llama", "method=uniform", "eval.seqlen=64", "eval.max_windows=2",
        "logging.wandb.mode=disabled", "logging.progress=false"]
PARAS = "\n\n".join(f"Paragraph {i} tells a short story about a cat." for i in range(4))
LATIN1 = "plain words, then caf\xe9".encode("latin-1")


def _n_tokens(text: str) -> int:
    """Independent count: the embedded tokenizer straight from transformers."""
    from transformers import AutoTokenizer

    from kvbench.model import embedded_model_path

    return len(AutoTokenizer.from_pretrained(embedded_model_path("smollm2-135m"))(text).input_ids)


def _files(tmp_path):
    (tmp_path / "short.txt").write_text(PARAS)
    (tmp_path / "binary.txt").write_bytes(b"some text\n\n\x00\x01\x02 more")
    (tmp_path / "latin1.txt").write_bytes(LATIN1)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    (tmp_path / "afile").write_text("not a folder")


CASES = [  # (overrides, env, the error line must contain)
    (["kv.bits=5"], {}, "kv.bits=5 is not supported"),
    (["kv.bits=four"], {}, "kv.bits=four: an integer is expected"),
    (["kv.group_size=7"], {}, "kv.group_size=7 does not divide head_dim=16 of tiny-llama"),
    (["eval.seqlen=0"], {}, "eval.seqlen=0: a window needs at least 2 tokens"),
    (["eval.seqlen=1"], {}, "eval.seqlen=1: a window needs at least 2 tokens"),
    (["eval.max_windows=0"], {}, "eval.max_windows=0: use a positive number"),
    (["calib.num_samples=0"], {}, "calib.num_samples=0: calibration needs at least 1 sample"),
    (["kv.prefill=full"], {}, "kv.prefill=full: perplexity scores the whole window in one prefill forward"),
    (["kv.backend=kernel", "method.key_axis=channel", "eval=harness", "eval.tasks=[piqa]", "eval.batch_size=4"], {},
     "kv.backend=kernel packs the padding of a batch with the tokens"),
    (["kv.backend=kernel", "method.value_axis=channel"], {}, "kv.backend=kernel reads values with one range per token"),
    (["eval=harness", "eval.tasks=[piqaa]"], {}, "Unknown lm-eval task 'piqaa'. Did you mean 'piqa'?"),
    (["output_dir={tmp}/afile/out"], {}, "output_dir={tmp}/afile/out is not writable"),
    (["data=text", "data.path={tmp}/missing.txt"], {}, "data.path={tmp}/missing.txt is not a readable file"),
    (["data=text", "data.path={tmp}/binary.txt"], {}, "is a binary file, not text (NUL byte at offset 11)"),
    (["data=text", "data.path={tmp}/latin1.txt"], {}, "latin1.txt is not UTF-8 text: byte 0xe9 at offset {latin1}"),
    (["data=text", "data.path={tmp}/bad.jsonl"], {}, "bad.jsonl:2: not valid JSON"),
    (["data=text", "data.path={tmp}/short.txt"], {}, "short.txt has {short} tokens; one evaluation window needs eval.seqlen=64"),
    (["model=llama-2-7b"], {"HF_HUB_OFFLINE": "1"}, "meta-llama/Llama-2-7b-hf is not reachable"),
    (["model=llama-2-7b"], {"HF_ENDPOINT": "http://127.0.0.1:9"}, "meta-llama/Llama-2-7b-hf is not reachable"),
]


@pytest.mark.parametrize("overrides, env, message", CASES, ids=[" ".join(c[0]) + " " + " ".join(c[1]) for c in CASES])
def test_bad_input_is_one_line_before_any_load(tmp_path, overrides, env, message):
    _files(tmp_path)
    out = tmp_path / "out"
    args = [*BASE, f"output_dir={out}", *(o.format(tmp=tmp_path) for o in overrides)]
    hf_home = tmp_path / "hf"  # an empty Hugging Face cache: the hub model is not there
    if "eval=harness" in overrides:  # lm-eval's task index is built once per lm-eval version (~10-30 s), then cached
        from kvbench.validate import lm_eval_tasks

        lm_eval_tasks()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kvbench", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HOME": str(hf_home), **env})
    wall = time.perf_counter() - t0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kvbench: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    expected = message.format(tmp=tmp_path, latin1=LATIN1.index(b"\xe9"), short=_n_tokens(PARAS) if "{short}" in message else 0)
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr
    assert not list(tmp_path.rglob("metrics.json"))
    print(f"{wall:.1f} s")
    assert wall < 30, f"{wall:.1f} s"  # torch's import alone is ~5 s on a loaded 2-core machine


def test_hub_model_offline_fails_in_seconds(monkeypatch, tmp_path):
    """The hub probe answers at once when the endpoint refuses; no minute of retries."""
    from kvbench.model import loading as models
    from kvbench.config import ModelConfig
    from omegaconf import OmegaConf

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    models.hub_reachable.cache_clear()
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="not reachable .* model.path="):
        models.model_config(OmegaConf.structured(ModelConfig(name="x", hf_id="someone/some-model")))
    assert time.perf_counter() - t0 < 5
    models.hub_reachable.cache_clear()


def test_sweep_dry_run_validates_every_run(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("program: kvbench\nmethod: grid\nparameters:\n  eval.tasks:\n    values: ['[piqa]', '[piqaa]']\n"
                    "command: [python, -m, kvbench, eval=harness, '${args_no_hyphens}']\n")
    proc = subprocess.run([sys.executable, "-m", "kvbench.sweep", str(spec), "--dry-run", *BASE, f"output_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Unknown lm-eval task 'piqaa'" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_relabelled_artifact_is_refused(compose, tiny_model, tmp_path):
    """3-bit KVQuant codebooks stored under the 4-bit key, checksum and sidecar made to match, are
    refused by shape; a sidecar that disagrees with its tensors is refused too."""
    from kvbench.calibration import artifact_path, load_artifact, prepare, save_artifact
    from kvbench.validate import check

    model, tok, _ = tiny_model
    common = [*BASE, "method=kvquant", "calib.num_samples=2", "calib.seqlen=32", f"calib.cache_dir={tmp_path}",
              f"output_dir={tmp_path / 'out'}"]
    three, four = compose([*common, "kv.bits=3"]), compose([*common, "kv.bits=4"])
    c3, c4 = check(three), check(four)
    p3 = prepare(three, model, tok, c3.splits, c3.method)
    p4, key4, meta4 = artifact_path(four, c4.method)
    assert p3 != p4
    tensors3 = load_artifact(p3, artifact_path(three, c3.method)[1], c3.method)
    assert tensors3["k_cb.0"].shape == (8,)
    save_artifact(p4, key4, meta4, tensors3, c4.method)  # right key, right checksum, bits=4 in the sidecar
    with pytest.raises(UserError, match=r"holds k_cb\.0 of shape \(8,\); kvquant at kv.bits=4 expects \(16\)"):
        load_artifact(p4, key4, c4.method)
    side = json.loads(p4.with_suffix(".json").read_text())
    side["tensors"]["k_cb.0"]["shape"] = [16]
    p4.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(UserError, match="does not match its sidecar's tensor shapes"):
        load_artifact(p4, key4, c4.method)
    side = json.loads(p3.with_suffix(".json").read_text())
    assert side["bits"] == 3 and side["model_dims"] == {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16}
    assert side["tensors"]["k_lo.0"] == {"shape": [2, 16], "dtype": "float32"}
