"""Decode steps replayed as CUDA graphs (:mod:`kvbench.cache.graphs`) give the eager steps' logits, bit for
bit: the packed cache across flushes (the graph kept while the store has room) and transformers' StaticCache.
GPU only."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbench.cache import register_packed_attention

    register_packed_attention()
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)  # head_dim 128
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def _decode(model, cache, prompt, steps: int, graphed: bool):
    """Greedy decode; returns the logits of every step ``(steps, B, vocab)`` and the decoder (or None)."""
    from kvbench.cache.graphs import GraphedDecoder, decode_step

    B, T = prompt.shape
    dec = GraphedDecoder(model, cache, B) if graphed else None
    out = []
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
        for i in range(steps):
            ids = logits.argmax(-1, keepdim=True)
            if dec is not None:
                logits = dec(ids, T + i)
            else:
                logits = decode_step(model, cache, ids, torch.tensor([T + i], device="cuda"))
            out.append(logits.clone())
    return torch.stack(out), dec


@pytest.mark.parametrize("bits", [4, 2])
def test_packed_cache_replayed_steps_equal_eager_steps(bits):
    from kvbench.cache import PACKED_ATTN, PackedCacheSpec, make_packed_cache

    model = _model()
    model.set_attn_implementation(PACKED_ATTN)
    spec = PackedCacheSpec(key_bits=bits, value_bits=bits, key_block=32, recent_window=16, sink_tokens=4)
    prompt = torch.randint(0, 512, (2, 200), device="cuda")
    eager, _ = _decode(model, make_packed_cache(model.config, spec), prompt, 100, graphed=False)
    cache = make_packed_cache(model.config, spec)
    graphed, dec = _decode(model, cache, prompt, 100, graphed=True)
    assert torch.equal(graphed, eager), (graphed - eager).abs().max()
    # a flush every 32 steps runs eagerly; the graph survives it unless the store grows and moves: capacity
    # 192 after the prompt's 160 packed tokens (12.5 % room, whole key blocks) takes the first flush, the second
    # (224 tokens) moves it to 256, which takes the third. Every other step is a replay.
    flushes = (cache.layers[0].n_packed - 160) // 32
    assert flushes == 3 and dec.stats == {"eager": 1 + flushes, "captured": 2, "replayed": 100 - 1 - flushes}, dec.stats
    assert [int(x.recent_len) for x in cache.layers] == [x.n_recent for x in cache.layers]


def test_static_cache_replayed_steps_equal_eager_steps():
    from transformers import StaticCache

    model = _model()
    model.set_attn_implementation("sdpa")
    prompt = torch.randint(0, 512, (2, 200), device="cuda")
    runs = [_decode(model, StaticCache(config=model.config, max_cache_len=300), prompt, 50, graphed=g)
            for g in (False, True)]
    assert torch.equal(runs[1][0], runs[0][0]), (runs[1][0] - runs[0][0]).abs().max()
    assert runs[1][1].stats == {"eager": 1, "captured": 1, "replayed": 49}
