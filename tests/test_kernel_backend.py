"""KVQuant through ``kv.backend=kernel``: the packed cache gives the simulated numbers.

Tolerances (tiny random Llama, fp32, calibrated KVQuant): perplexity within ``PPL_REL`` and logits within
``LOGITS_REL`` relative L2 of the simulated backend (measured: ppl ~1e-5, logits 3e-3 .. 8e-3; the
packed format rounds scales, zero points and codebooks to fp16, which moves a few codes across a
decision boundary). Most tests use the reference kernels (same storage, same numbers); one runs the
Triton kernels under the interpreter, prefill and fused decode.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from kvbench.errors import UserError  # noqa: E402
from kvbench.cache import patched  # noqa: E402

PPL_REL, LOGITS_REL = 1e-3, 2e-2
CALIB = ["method=kvquant", "model=tiny-llama", "calib.num_samples=2", "calib.seqlen=64"]
KEYS_ONLY = ["method.value_outliers=false"]  # dense-and-sparse keys only
CONFIGS = {  # name -> overrides: every component the packed format holds
    "nuq4-1%": [],  # NUQ keys + values, pre-RoPE, 1 % key and value outliers, 1 sink (the paper's defaults)
    "nuq4-1%-keys-only": [*KEYS_ONLY],
    "nuq4-token-keys": ["method.key_axis=token"],  # per-token keys, each token's sparse outliers
    "nuq2-1%-qnorm": [*KEYS_ONLY, "kv.bits=2", "method.qnorm=true"],
    "nuq4-group8": [*KEYS_ONLY, "kv.group_size=8", "method.outlier_frac=0"],
    "int4-post-rope": ["method.nuq=false", "method.pre_rope=false", "method.outlier_frac=0", "method.sink_tokens=0"],
    "nuq4-window": [*KEYS_ONLY, "method.recent_window=8", "method.sink_tokens=4"],
}


@pytest.fixture(scope="module")
def kvquant(tiny_model, tmp_path_factory):
    """``overrides -> calibrated KVQuant`` on the tiny model (artifacts in a temporary store)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import compose_config

    from kvbench.calibration import prepare
    from kvbench.data import load_splits
    from kvbench.run import build_method

    model, tok, info = tiny_model
    store = tmp_path_factory.mktemp("calib")

    def make(overrides):
        cfg = compose_config([*CALIB, f"calib.cache_dir={store}", *overrides])
        method = build_method(cfg, info)
        prepare(cfg, model, tok, load_splits(cfg.data), method)
        return method

    return make


def _ids(tiny_model, n):
    model, tok, _ = tiny_model
    return tok("The quick brown fox jumps over the lazy dog. " * 40, return_tensors="pt").input_ids[:, :n]


def _with_impl(method, impl):
    """The method with ``kv.kernel.impl=impl`` (a copy: the config is what selects the kernels)."""
    import copy

    from omegaconf import OmegaConf

    m = copy.copy(method)
    m.kv = OmegaConf.merge(method.kv, {"kernel": {"impl": impl}})
    return m


def _forward(model, method, backend, ids, impl="reference"):
    """``(logits (1, T, V), ppl, cache)`` of one forward through ``backend``."""
    with torch.no_grad(), patched(model, _with_impl(method, impl), backend) as patch:
        logits = model(ids).logits.float()
    cache = patch.last_cache
    ppl = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).exp().item()
    return logits, ppl, cache


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_kvquant_matches_simulated(tiny_model, kvquant, name):
    model = tiny_model[0]
    method = kvquant(CONFIGS[name])
    ids = _ids(tiny_model, 128)
    sim, sim_ppl, _ = _forward(model, method, "simulated", ids)
    packed, ppl, cache = _forward(model, method, "kernel", ids)
    assert ppl == pytest.approx(sim_ppl, rel=PPL_REL)
    assert _rel(packed, sim) < LOGITS_REL, (name, _rel(packed, sim))
    lay, cfg = cache.layers[0], method.cfg
    assert lay.n_sink == cfg.sink_tokens and lay.n_recent == min(cfg.recent_window, 128)
    assert lay.n_packed == 128 - lay.n_sink - lay.n_recent  # token by token, not in whole key blocks
    store = lay.stores[0]
    assert (store.k_lut is not None) and (store.v_lut is not None) and (lay._inv_freq is not None) == cfg.pre_rope
    assert ("ol" in store.sparse) == (cfg.outlier_frac > 0)
    assert ("vol" in store.sparse) == (cfg.outlier_frac > 0 and cfg.value_outliers)


def test_packed_kvquant_memory(tiny_model, kvquant):
    """Bytes per token measured from the cache's tensors: below fp16, and the sparse outliers cost memory."""
    model, _, info = tiny_model
    ids = _ids(tiny_model, 400)
    fp16 = 2 * info.num_layers * info.num_kv_heads * info.head_dim * 2  # K and V of every layer, 2 bytes
    measured = {}
    for frac in (0.0, 0.01):
        method = kvquant([*KEYS_ONLY, f"method.outlier_frac={frac}"])
        *_, cache = _forward(model, method, "kernel", ids)
        measured[frac] = sum(cache.nbytes_per_token())
    assert measured[0.0] < measured[0.01] < 0.75 * fp16, (measured, fp16)


def test_packed_kvquant_triton_prefill_and_decode(tiny_model, kvquant):
    """Triton kernels (interpreted): prefill logits and fused-decode generate() match the reference
    kernels exactly (tokens) and the simulated backend within the tolerance (per-step logits)."""
    model = tiny_model[0]
    method = kvquant(CONFIGS["nuq4-1%"])
    ids = _ids(tiny_model, 40)
    ref, *_ = _forward(model, method, "kernel", ids, impl="reference")
    tri, *_ = _forward(model, method, "kernel", ids, impl="triton")
    assert _rel(tri, ref) < 1e-5
    outs = {}
    for backend, impl in (("simulated", "reference"), ("kernel", "reference"), ("kernel", "triton")):
        with torch.no_grad(), patched(model, _with_impl(method, impl), backend) as patch:
            outs[backend, impl] = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True,
                                                 return_dict_in_generate=True, pad_token_id=0)
        cache = patch.last_cache
    assert cache.layers[0].mask_ok is True  # the decode steps took the fused path
    assert cache.get_seq_length() == 40 + 4 and cache.layers[0].n_packed == 40 + 4 - 1
    torch.testing.assert_close(outs["kernel", "triton"].sequences, outs["kernel", "reference"].sequences,
                               atol=0, rtol=0)
    sim = torch.stack(outs["simulated", "reference"].logits)  # (steps, 1, V)
    for impl in ("reference", "triton"):
        assert _rel(torch.stack(outs["kernel", impl].logits), sim) < LOGITS_REL, impl


@pytest.mark.parametrize("overrides, message", [
    (["kv.bits=8"], "kv.backend=kernel packs 2/3/4-bit codes"),
])
def test_unpackable_kvquant_is_one_line(compose, tiny_model, overrides, message):
    """Refused when the method is built (before calibration), as one line naming the override."""
    from kvbench.run import build_method

    cfg = compose([*CALIB, "kv.backend=kernel", *overrides])
    with pytest.raises(UserError, match=message) as err:
        build_method(cfg, tiny_model[2])
    assert "\n" not in str(err.value)
    build_method(compose([*CALIB, *overrides]), tiny_model[2])  # the simulated backend takes them all


def test_kernel_choice_is_config(compose, tiny_model, kvquant):
    """``kv.kernel.impl`` / ``kv.kernel.path`` are config keys (in config.yaml and the run hash); on a CPU
    ``auto`` runs the reference twins, and a bad name fails as one line naming the override."""
    from kvbench.cache import cache_factory

    cfg = compose([*CALIB, "kv.backend=kernel", "kv.kernel.impl=reference", "kv.kernel.path=tensor_core"])
    assert (cfg.kv.kernel.impl, cfg.kv.kernel.path) == ("reference", "tensor_core")
    model = tiny_model[0]
    method = kvquant(CONFIGS["nuq4-1%"])
    assert cache_factory(model, _with_impl(method, "auto"), "kernel", 2)().layers[0].spec.impl == "reference"
    from kvbench.config import check_overrides  # an Enum: a bad name is refused when composing

    assert check_overrides(["kv.kernel.impl=cuda"]) == "kv.kernel.impl=cuda: expected one of auto, triton, reference."
