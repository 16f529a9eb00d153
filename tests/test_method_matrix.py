"""Every method x component combination runs on the tiny model (kvpress-style shared matrix).

Method engineers add their configurations to MATRIX. Each entry is composed through Hydra (so the
overrides are validated against the schemas), calibrated on a few short sequences if the method
needs it, then used for a scoring forward and a short ``generate()``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tokens

MATRIX = [
    ("fp16", []),
    ("uniform", ["kv.bits=8"]),
    ("uniform", ["kv.bits=4", "kv.group_size=8"]),
    ("uniform", ["kv.bits=3", "method.key_axis=channel", "method.key_block=16"]),
    ("uniform", ["kv.bits=2", "method.value_axis=channel", "method.key_block=8"]),
    ("uniform", ["kv.bits=2", "method.sink_tokens=4", "method.recent_window=8"]),
    ("kvquant", []),  # nuq4-1%, pre-RoPE per-channel keys, Fisher, one sink token
    ("kvquant", ["kv.bits=3", "method.pre_rope=false", "calib.fisher=false"]),
    ("kvquant", ["kv.bits=3", "method.key_axis=token", "method.outlier_frac=0.1"]),
    ("kvquant", ["kv.bits=3", "method.nuq=false", "method.outlier_frac=0"]),
    ("kvquant", ["kv.bits=2", "method.qnorm=true", "method.sink_tokens=0", "method.recent_window=8"]),
    ("qokv", []),  # 2 online attention-score groups (values at b+1/b-1), pre-RoPE key shift + searched scales
    ("qokv", ["kv.bits=3", "method.grouping=offline", "calib.fisher=false", "method.key_alpha=0.5"]),
    ("qokv", ["kv.bits=2", "method.group_shares=[0.1,0.4,0.5]", "method.key_bit_offsets=[2,1,0]",
              "method.value_bit_offsets=[2,1,0]", "method.group_thresholds=[2.0,0.5]", "method.top_recent=4",
              "method.pre_rope=true"]),
    ("qokv", ["kv.bits=4", "method.sink_tokens=2", "method.recent_window=8", "method.scale_values=false"]),
    ("qokv", ["kv.bits=3", "method.base=nuq", "method.grouping=none", "calib.fisher=false"]),  # + KVQuant codebooks
    ("qokv", ["kv.bits=4", "method.pre_rope=false", "method.shift_keys=mean", "method.shift_values=mid"]),
    # frontier components (issue 19): Hadamard rotation, per-layer / per-head widths, the KIVI preset
    ("uniform", ["kv.bits=3", "method.rotation=hadamard"]),
    ("uniform", ["kv.bits=2", "method.key_axis=channel", "method.key_block=16", "method.rotation=hadamard",
                 "method.rotate=keys", "method.layer_bits=head", "method.bit_budget=2.5"]),
    ("kvquant", ["kv.bits=3", "method.rotation=hadamard", "method.rotate=values", "method.layer_bits=layer"]),
    ("qokv", ["kv.bits=3", "method.rotation=hadamard", "method.layer_bits=layer", "method.base=nuq"]),
    ("kivi", ["kv.bits=2", "method.value_group_size=8", "method.key_block=8", "method.recent_window=8"]),
    ("kivi", ["kv.bits=3", "method.value_group_size=8", "method.key_block=8", "method.recent_window=8",
              "method.rotation=hadamard", "method.layer_bits=layer"]),
]


def _ids(entry):
    return f"{entry[0]}:{','.join(entry[1]) or 'default'}"


@pytest.mark.parametrize("entry", MATRIX, ids=[_ids(e) for e in MATRIX])
def test_method_runs(entry, tiny_model, wiki_splits, compose, tmp_path):
    from kvbench.cache import QuantizingCache, patched
    from kvbench.run import build_method

    name, overrides = entry
    cfg = compose([f"method={name}", "model=tiny-llama", "calib.num_samples=2", "calib.seqlen=64",
                   f"calib.cache_dir={tmp_path}", *overrides])
    model, tok, info = tiny_model
    method = build_method(cfg, info)
    if method.calibration_needs():
        from kvbench.calibration import prepare

        prepare(cfg, model, tok, wiki_splits, method)
    ids = tokens(tok)
    with torch.no_grad():
        ref = model(ids).logits
        with patched(model, method):
            out = model(ids)
            gen = model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)
    assert torch.isfinite(out.logits).all()
    assert gen.shape == (1, 20)
    assert 0 < method.avg_bits(ids.shape[1]) <= 16
    if method.is_identity:
        assert torch.equal(out.logits, ref)
    else:
        assert isinstance(out.past_key_values, QuantizingCache)
        assert not torch.equal(out.logits, ref), "a quantizing method left the logits unchanged"


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).exp().item()


# The backend axis: what the packed format cannot hold, and the override its one-line refusal names.
KERNEL_REFUSES = {
    "uniform:kv.bits=2,method.value_axis=channel,method.key_block=8": "method.value_axis=token",
    "uniform:kv.bits=3,method.rotation=hadamard": "method.rotation=none",
    "uniform:kv.bits=2,method.key_axis=channel,method.key_block=16,method.rotation=hadamard,method.rotate=keys,"
    "method.layer_bits=head,method.bit_budget=2.5": "method.rotation=none",
    "kvquant:kv.bits=3,method.rotation=hadamard,method.rotate=values,method.layer_bits=layer": "method.rotation=none",
    "qokv:kv.bits=3,method.rotation=hadamard,method.layer_bits=layer,method.base=nuq": "method.rotation=none",
    "kivi:kv.bits=3,method.value_group_size=8,method.key_block=8,method.recent_window=8,method.rotation=hadamard,"
    "method.layer_bits=layer": "method.rotation=none",
}
LOGITS_REL, PPL_REL = 4e-2, 3e-3  # measured on wide_model: logits 1e-3 .. 2.8e-2, perplexity <= 1.6e-3
# 2-bit per-token keys and values (4 levels over each token's range) on a random-weight model: an fp16-rounded
# scale or zero point flips more codes, and each flip is a whole step; measured logits 7.0e-2, perplexity 9.5e-3
LOOSER = {"uniform:kv.bits=2,method.sink_tokens=4,method.recent_window=8": (0.1, 2e-2)}


@pytest.fixture(scope="module")
def wide_model(tiny_model):
    """The tiny model's recipe with head_dim 32 (GQA 4/2): the packed layout puts 32 one-bit codes in a word,
    so odd widths (QoKV's b+1 / b-1 groups, 3-bit) need head_dim % 32 == 0 (tiny-llama's is 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbench.model.loading import info_from_config

    tok = tiny_model[1]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return model, tok, info_from_config(config, "tiny-llama", 8192)


@pytest.mark.parametrize("entry", [e for e in MATRIX if e[0] != "fp16"], ids=[_ids(e) for e in MATRIX if e[0] != "fp16"])
def test_kernel_backend_matches_simulated_or_refuses(entry, wide_model, wiki_splits, compose, tmp_path, monkeypatch):
    """The backend axis of the matrix: every configuration runs on the packed cache (reference kernels) with
    the simulated backend's logits (relative L2 within ``LOGITS_REL``) and perplexity (within ``PPL_REL``),
    and generates; or it is one of :data:`KERNEL_REFUSES`, refused at validation (before weights load or
    calibration starts) in one line naming the override. The packed format rounds scales, zero points and
    codebooks to fp16, which moves a few codes across a decision boundary (tolerances: see ``LOGITS_REL``)."""
    from kvbench.cache import PackedCache, patched
    from kvbench.errors import UserError
    from kvbench.run import build_method

    name, overrides = entry
    base = [f"method={name}", "model=tiny-llama", "calib.num_samples=2", "calib.seqlen=64", f"calib.cache_dir={tmp_path}",
            *overrides]
    from kvbench.calibration import stats

    # wide_model's configs name tiny-llama: the in-process statistics cache (keyed by the model config) must
    # neither serve tiny-llama's statistics here nor keep wide_model's for the tests after this one
    monkeypatch.setattr(stats, "_STATS_CACHE", {})
    model, tok, info = wide_model
    if _ids(entry) in KERNEL_REFUSES:
        with pytest.raises(UserError) as err:
            build_method(compose([*base, "kv.backend=kernel"]), info).check_packable()
        assert "\n" not in str(err.value) and KERNEL_REFUSES[_ids(entry)] in str(err.value), err.value
        return
    ids = tokens(tok)
    out = {}
    for backend in ("simulated", "kernel"):
        cfg = compose([*base, f"kv.backend={backend}", "kv.kernel.impl=reference"])
        method = build_method(cfg, info)
        method.check_packable()
        if method.calibration_needs():
            from kvbench.calibration import prepare

            prepare(cfg, model, tok, wiki_splits, method)
        with torch.no_grad(), patched(model, method, backend, cfg.kv.kernel) as patch:
            logits = model(ids).logits.float()
            cache = patch.last_cache
            gen = model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)
        assert gen.shape == (1, 20) and torch.isfinite(logits).all()
        out[backend] = logits, _ppl(logits, ids)
    assert isinstance(cache, PackedCache)
    (sim, sim_ppl), (packed, ppl) = out["simulated"], out["kernel"]
    rel = ((packed - sim).norm() / sim.norm()).item()
    logits_rel, ppl_rel = LOOSER.get(_ids(entry), (LOGITS_REL, PPL_REL))
    assert rel < logits_rel and ppl == pytest.approx(sim_ppl, rel=ppl_rel), (rel, ppl, sim_ppl)
