"""``model.random_init=true``: a named architecture with seeded random weights, no download (issue 17)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from kvbench.model import build_random_model, load_model, model_fingerprint, resolve_dtype
from kvbench.model.loading import hash_uniform

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.architecture.num_hidden_layers=2", "model.architecture.hidden_size=64",
         "model.architecture.intermediate_size=128", "model.architecture.num_attention_heads=4",
         "model.architecture.num_key_value_heads=2", "model.architecture.head_dim=16", "model.architecture.vocab_size=300"]
# benchmarks/gpu_pipeline.py's agreement model on its synthetic corpus, CPU fp32 (the GPU value is in
# benchmarks/results/gpu_pipeline.json); made by `python benchmarks/gpu_pipeline.py --small --device cpu --parts agreement`
CPU_AGREEMENT_PPL = 514.8850991398299


def _pipeline():
    spec = importlib.util.spec_from_file_location("gpu_pipeline", ROOT / "benchmarks" / "gpu_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2-7b", "opt-6.7b"])
def test_every_architecture_config_builds_scaled_down(compose, name):
    over = [f"model={name}", "model.random_init=true", "model.architecture.num_hidden_layers=1",
            "model.architecture.vocab_size=300"]
    over += ["model.architecture.hidden_size=64", "model.architecture.num_attention_heads=4"]
    over += ["model.architecture.ffn_dim=128", "model.architecture.word_embed_proj_dim=64"] if name == "opt-6.7b" else \
        ["model.architecture.intermediate_size=128", "model.architecture.num_key_value_heads=2"]
    if name != "opt-6.7b" and name != "qwen2-7b":
        over.append("model.architecture.head_dim=16")
    cfg = compose(over)
    model, tok, info = load_model(cfg.model, "cpu")
    assert info.num_layers == 1 and info.num_heads == 4 and next(model.parameters()).dtype == torch.float32
    ids = tok("The pass key is 71432.", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_real_dims_from_the_config_without_weights(compose):
    from kvbench.model import info_from_config, model_config

    cfg = compose(["model=llama-3-8b", "model.random_init=true"])
    info = info_from_config(model_config(cfg.model), "llama-3-8b")
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (32, 32, 8, 128)
    c = model_config(cfg.model)
    assert (c.vocab_size, c.intermediate_size, c.rope_parameters["rope_theta"]) == (128256, 14336, 500000.0)


def test_seeded_and_in_the_fingerprint(compose):
    a = compose(["model=llama-3-8b", "model.random_init=true", *SMALL])
    b = compose(["model=llama-3-8b", "model.random_init=true", "model.init_seed=1", *SMALL])
    wa, wb = (build_random_model(c.model).model.layers[0].self_attn.q_proj.weight for c in (a, b))
    assert torch.equal(wa, build_random_model(a.model).model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(wa, wb)
    assert abs(wa.std().item() - 0.02) < 2e-3 and abs(wa.mean().item()) < 2e-3
    fa, fb = model_fingerprint(a.model), model_fingerprint(b.model)
    assert fa["random_init"] and fa["init_seed"] == 0 and fb["init_seed"] == 1
    assert fa["architecture"]["hidden_size"] == 64


def test_run_identity_of_real_weights_unchanged(compose):
    """The random-init keys leave the hash of a run on real weights as it was before they existed."""
    from kvbench.tracking.store import result_config

    d = result_config(compose(["model=tiny-llama"]))
    assert set(d["model"]) == {"name", "hf_id", "path", "embedded", "dtype", "device_map", "max_context", "trust_remote_code"}
    assert "architecture" in result_config(compose(["model=llama-3-8b", "model.random_init=true"]))["model"]


def test_hash_uniform_is_exact_integer_math():
    """The weights are a function of (seed, index) alone, so a chunked build equals a one-shot one."""
    x = hash_uniform(1000, 7, 0.02, "cpu", torch.float32)
    y = hash_uniform(1000, 7, 0.02, "cpu", torch.float32, chunk=7)
    assert torch.equal(x, y)
    assert x.abs().max() <= 0.02 * math.sqrt(3) and abs(x.std().item() - 0.02) < 2e-3


def test_dtype_auto():
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_cpu_agreement_perplexity_pinned(tmp_path):
    """The CPU side of the CPU/GPU agreement (the GPU side: benchmarks/results/gpu_pipeline.json)."""
    gp = _pipeline()
    ppl = gp.agreement_ppl("cpu", gp.write_corpus(tmp_path), tmp_path / "runs")
    assert ppl == pytest.approx(CPU_AGREEMENT_PPL, rel=1e-5)


def test_python_m_kvbench_runs_a_random_init_model(tmp_path):
    """The whole pipeline (validate -> model -> calibrate -> patch -> evaluate -> record) on random weights."""
    import subprocess
    import sys

    corpus = _pipeline().write_corpus(tmp_path)
    r = subprocess.run([sys.executable, "-m", "kvbench", "model=llama-3-8b", "model.random_init=true", *SMALL,
                        "data=text", f"data.path={corpus}", "method=uniform", "kv.bits=4", "eval.seqlen=256",
                        "eval.max_windows=2", "logging.wandb.mode=disabled", "logging.progress=false",
                        f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "uniform 4-bit on llama-3-8b/text" in r.stdout
    inputs = next((tmp_path / "out").rglob("inputs.json")).read_text()
    assert '"random_init": true' in inputs and '"init_seed": 0' in inputs
