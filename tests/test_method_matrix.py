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


@pytest.mark.parametrize("entry", [e for e in MATRIX if e[0] != "fp16"], ids=[_ids(e) for e in MATRIX if e[0] != "fp16"])
def test_kernel_backend_matches_simulated_or_refuses(entry, tiny_model, wiki_splits, compose, tmp_path):
    """The backend axis of the matrix: every configuration either runs on the packed cache (reference
    kernels) with the simulated backend's perplexity, or is refused in one line naming what the packed
    format cannot hold, before any calibration."""
    from kvbench.cache import PackedCache, patched
    from kvbench.errors import UserError
    from kvbench.run import build_method

    name, overrides = entry
    base = [f"method={name}", "model=tiny-llama", "calib.num_samples=2", "calib.seqlen=64", f"calib.cache_dir={tmp_path}",
            *overrides]
    model, tok, info = tiny_model
    ids = tokens(tok)
    ppl = {}
    for backend in ("simulated", "kernel"):
        cfg = compose([*base, f"kv.backend={backend}", "kv.kernel.impl=reference"])
        try:
            method = build_method(cfg, info)
            if method.calibration_needs():
                from kvbench.calibration import prepare

                prepare(cfg, model, tok, wiki_splits, method)
            with torch.no_grad(), patched(model, method, backend, cfg.kv.kernel) as patch:
                logits = model(ids).logits
                gen = model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)
        except UserError as e:
            assert backend == "kernel" and "\n" not in str(e) and ("method." in str(e) or "kv." in str(e)), e
            return
        assert gen.shape == (1, 20) and torch.isfinite(logits).all()
        ppl[backend] = _ppl(logits, ids)
    assert isinstance(patch.last_cache, PackedCache)
    assert ppl["kernel"] == pytest.approx(ppl["simulated"], rel=2e-2), ppl
