"""Kernel backend: Triton kernels (under TRITON_INTERPRET=1 on CPU) against their PyTorch twins.

Tolerances: packing and quantize-and-pack are bit-exact (atol=0); decode attention agrees with the
reference (fp32 attention over the dequantized K/V) within ``REL_TOL`` relative L2 error (the kernels
use fp16 tensor-core operands); the cache's generate() output matches the reference-kernel cache.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from kvbench.kernels import ops, reference  # noqa: E402

REL_TOL = 1e-2  # decode attention vs reference (measured ~5e-4 split_k, ~9e-4 tensor_core, ~1e-5 cuda_core)
B, H, D = 2, 2, 64


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_pack_unpack_bit_exact(bits, d):
    codes = torch.randint(0, 2**bits, (3, 5, d))
    ref = ops.pack_codes(codes, bits, impl="reference")
    tri = ops.pack_codes(codes, bits, impl="triton")
    assert ref.shape == (3, 5, bits * d // 32) and ref.dtype == torch.int32
    torch.testing.assert_close(tri, ref, atol=0, rtol=0)
    torch.testing.assert_close(ops.unpack_codes(tri, bits, d, impl="triton"), codes.int(), atol=0, rtol=0)
    torch.testing.assert_close(ops.unpack_codes(ref, bits, d, impl="reference"), codes.int(), atol=0, rtol=0)


@pytest.mark.parametrize(
    "bits,variant", [(2, "uniform"), (3, "uniform"), (4, "uniform"), (3, "nuq"), (4, "outliers"), (2, "calibrated")]
)
def test_quantize_pack_bit_exact(bits, variant):
    x = torch.randn(B, H, 32, D) * 2
    kw = {}
    if variant == "nuq":
        kw["lut"] = torch.sort(torch.rand(H, D, 2**bits) * (2**bits - 1), -1).values.half()
    if variant == "outliers":
        kw["clamp_lo"], kw["clamp_hi"] = -torch.ones(H, D), torch.ones(H, D)
    if variant == "calibrated":
        kw["scale"], kw["zero"] = torch.full((H, D), 4.0 / (2**bits - 1)), torch.full((H, D), -2.0)
    for r, t in zip(ops.quantize_pack_keys(x, bits, 16, impl="reference", **kw),
                    ops.quantize_pack_keys(x, bits, 16, impl="triton", **kw)):
        torch.testing.assert_close(t, r, atol=0, rtol=0)
    vkw = {"lut": kw["lut"]} if "lut" in kw else {}
    for r, t in zip(ops.quantize_pack_values(x, bits, 32, impl="reference", **vkw),
                    ops.quantize_pack_values(x, bits, 32, impl="triton", **vkw)):
        torch.testing.assert_close(t, r, atol=0, rtol=0)


def test_dequantize_error_shrinks_with_bits():
    x = torch.randn(B, H, 32, D)
    errs = []
    for bits in (2, 3, 4):
        w, s, z = ops.quantize_pack_keys(x, bits, 16, impl="reference")
        errs.append(_rel(reference.dequantize_keys(w, s, z, bits, 16), x))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.1, errs


CASES = [  # (n_rep, key_bits, value_bits, value_group, sink, recent, pre_rope, outliers, nuq)
    (1, 4, 4, D, 0, 0, False, False, False),  # MHA, tensor-core path
    (4, 3, 2, D, 2, 5, False, False, False),  # GQA, 3-bit keys, sink + recent
    (2, 2, 4, 32, 1, 3, False, False, False),  # grouped values -> CUDA-core path
    (8, 4, 3, 32, 0, 1, False, False, False),  # MQA-like (H_kv heads shared by 8)
    (2, 4, 4, 32, 3, 4, True, False, False),  # pre-RoPE keys, RoPE in kernel
    (1, 4, 4, 32, 0, 3, False, True, False),  # sparse outliers
    (2, 3, 3, 32, 1, 2, True, True, True),  # everything
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_decode_attention(case):
    rep, kb, vb, grp, sink, rec, pre, ol, nuq = case
    T = sink + rec + 2 * 32
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    q = torch.randn(B, H * rep, D) * 2
    inv_freq = reference.default_inv_freq(D) if pre else None
    if pre:
        k = reference.rope_at(k, torch.arange(T), inv_freq)  # cache receives post-RoPE keys
    lut = (lambda b: torch.sort(torch.rand(H, D, 2**b) * (2**b - 1), -1).values.half()) if nuq else (lambda b: None)
    clamp = (-1.5 * torch.ones(H, D), 1.5 * torch.ones(H, D)) if ol else None
    kv = ops.build_packed_kv(k, v, kb, vb, 32, grp, sink, rec, lut(kb), lut(vb), clamp, inv_freq, impl="triton")
    if ol:
        assert int(kv.ol_ptr[..., -1].min()) > 0
    ref = ops.decode_attention(q, kv, impl="reference")
    out = ops.decode_attention(q, kv, impl="triton", n_splits=2)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < REL_TOL, _rel(out, ref)
    # the reference itself: plain fp32 attention over the dequantized K/V
    keys, vals = reference.dequantize_all(kv)
    keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
    att = torch.softmax(torch.einsum("bhd,bhtd->bht", q, keys) / D**0.5, -1)
    torch.testing.assert_close(ref, torch.einsum("bht,bhtd->bhd", att, vals), atol=1e-5, rtol=1e-5)
    if not (nuq or kb < 3 or vb < 3):  # and close to attention over the unquantized K/V at 3-4 bits
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        plain = torch.einsum("bht,bhtd->bhd", torch.softmax(torch.einsum("bhd,bhtd->bht", q, kk) / D**0.5, -1), vv)
        assert _rel(ref, plain) < 0.5


def test_all_paths_agree():
    """Every registered decode path (forced) on one packed cache they all apply to (head_dim 128: tensor_core's)."""
    from kvbench.kernels.triton import PATHS

    k, v = torch.randn(B, H, 32 + 3, 128), torch.randn(B, H, 32 + 3, 128)
    q = torch.randn(B, H * 2, 128)
    kv = ops.build_packed_kv(k, v, 4, 4, 16, 128, 0, 3, impl="reference")
    ref = ops.decode_attention(q, kv, impl="reference")
    for path in PATHS:
        out = ops.decode_attention(q, kv, impl="triton", path=path, n_splits=2, tile=16)
        assert _rel(out, ref) < REL_TOL, (path, _rel(out, ref))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_cache_generate_and_memory():
    """generate() with the fused Triton decode (pre-RoPE keys, sink, window) == the reference-kernel cache."""
    from kvbench.cache import PackedCacheSpec, enable_fused_decode, make_packed_cache

    model = _tiny_llama()
    enable_fused_decode(model)
    prompt = torch.randint(0, 97, (1, 40))
    spec = dict(key_bits=4, value_bits=4, value_group_size=32, key_block=16, sink_tokens=2, recent_window=4,
                pre_rope=True)
    outs = {}
    for impl in ("triton", "reference"):
        cache = make_packed_cache(model.config, PackedCacheSpec(impl=impl, **spec))
        with torch.no_grad():
            outs[impl] = model.generate(prompt, past_key_values=cache, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=0, rtol=0)
    lay = cache.layers[0]
    assert lay.get_seq_length() == 40 + 2 and lay.n_packed == 32 and lay.n_sink == 2
    # memory, measured from the real tensors over a longer sequence (reference kernels: same storage)
    cache = make_packed_cache(model.config, PackedCacheSpec(impl="reference", **spec))
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 200)), past_key_values=cache, use_cache=True)
    fp16_bytes = 2 * model.config.num_key_value_heads * 32 * 2  # K and V of all KV heads, head_dim 32, fp16
    per_tok = cache.nbytes_per_token()
    assert len(per_tok) == 2 and all(0 < b < 0.75 * fp16_bytes for b in per_tok), (per_tok, fp16_bytes)


def test_cache_decode_matches_dequantized_path():
    """Fused decode logits == logits from SDPA over the dequantized cache (non-fused attention)."""
    from kvbench.cache import PackedCacheSpec, enable_fused_decode, make_packed_cache

    model = _tiny_llama()
    prompt = torch.randint(0, 97, (1, 30))
    spec = PackedCacheSpec(key_bits=3, value_bits=3, value_group_size=32, key_block=16, recent_window=4)
    logits = []
    for fused in (False, True):
        if fused:
            enable_fused_decode(model)
        cache = make_packed_cache(model.config, spec)
        with torch.no_grad():
            model(prompt[:, :-1], past_key_values=cache, use_cache=True)
            logits.append(model(prompt[:, -1:], past_key_values=cache, use_cache=True).logits)
    assert cache.layers[0].n_packed == 16
    assert _rel(logits[1], logits[0]) < REL_TOL


def test_cache_knows_which_decode_steps_a_cuda_graph_can_replay():
    """The GPU copies of every layer's counts follow the host's through prefill, sink, decode and flush steps;
    ``decode_step_replayable`` is True exactly before the steps that leave the packed store and the sinks as
    they were; ``graph_key`` (what a captured step bakes in) changes only when a store grows and moves, not at
    a flush into room the store has."""
    from kvbench.cache import PackedCacheSpec, enable_fused_decode, make_packed_cache

    model = _tiny_llama()
    enable_fused_decode(model)
    spec = PackedCacheSpec(key_bits=4, value_bits=4, value_group_size=32, key_block=16, sink_tokens=3,
                           recent_window=4, impl="reference")
    cache = make_packed_cache(model.config, spec)
    ids = torch.randint(0, 97, (2, 41))
    seen, key_kept = [], {}
    with torch.no_grad():
        model(ids[:, :2], past_key_values=cache, use_cache=True)  # shorter than the sink
        for t in range(2, 41):
            lay = cache.layers[0]
            before = (lay.n_sink, lay.n_packed)
            replayable = cache.decode_step_replayable()
            words, key = lay.stores[0].k_words.data_ptr(), cache.graph_key()
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            unchanged = (lay.n_sink, lay.n_packed) == before and lay.stores[0].k_words.data_ptr() == words
            assert replayable == unchanged, (t, replayable, before, lay.n_sink, lay.n_packed)
            assert [int(x.recent_len) for x in cache.layers] == [x.n_recent for x in cache.layers]
            assert [int(st.n_len) for x in cache.layers for st in x.stores] == [x.n_packed for x in cache.layers]
            assert (cache.graph_key() == key) == (lay.stores[0].k_words.data_ptr() == words)
            seen.append(replayable)
            if lay.n_packed != before[1]:
                key_kept[lay.n_packed] = cache.graph_key() == key
    assert lay.n_sink == 3 and lay.n_packed == 32 and seen.count(False) == 3 and seen[-1], seen
    assert key_kept == {16: False, 32: True}, key_kept  # the first block allocates (room for 2); the second fits


def test_cpu_without_interpreter_fails_clearly(monkeypatch):
    from transformers import LlamaConfig

    from kvbench.cache import PackedCacheSpec, make_packed_cache

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="kv.backend=kernel needs a CUDA GPU with Triton"):
        make_packed_cache(LlamaConfig(num_hidden_layers=1), PackedCacheSpec(impl="triton"))
    for impl in ("reference", "auto"):  # the reference twins are fine; "auto" picks them on a CPU
        make_packed_cache(LlamaConfig(num_hidden_layers=1), PackedCacheSpec(impl=impl))


def test_cache_left_padding_falls_back_to_masked_attention():
    """A left-padded batch decodes through the masked (dequantized) path and matches the non-fused cache."""
    from kvbench.cache import PackedCacheSpec, enable_fused_decode, make_packed_cache

    model = _tiny_llama()
    ids = torch.randint(1, 97, (2, 40))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # row 0 is left-padded
    spec = PackedCacheSpec(key_bits=4, value_bits=4, value_group_size=32, key_block=16, recent_window=4,
                           impl="reference")
    outs = []
    for fused in (False, True):
        if fused:
            enable_fused_decode(model)
        cache = make_packed_cache(model.config, spec)
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3,
                                       do_sample=False, pad_token_id=0))
    assert cache.layers[0].mask_ok is False
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


def test_graphed_decoder_refuses_a_cache_whose_shapes_grow():
    """A DynamicCache's tensors grow every step: no graph can replay it, refused in one line before any work."""
    from transformers import DynamicCache

    from kvbench.cache.graphs import GraphedDecoder

    with pytest.raises(ValueError, match="DynamicCache cannot be replayed as a CUDA graph"):
        GraphedDecoder(_tiny_llama(), DynamicCache(), 2)
