"""OPT, Llama, Mistral, Qwen2 and Gemma3 attention (MHA, GQA, MQA, sliding windows, q/k norms) all
go through the quantizing cache: exact at 16 bits, pre-RoPE round trip, quantized and generating."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from kvbench.config import KVConfig
from kvbench.method import KVMethod, MethodConfig
from kvbench.model import model_info
from kvbench.cache import QuantizingCache, patched
from kvbench.methods.uniform import Uniform, UniformConfig

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
ARCHS = {
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                  ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256)),
    "llama-mha": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, intermediate_size=128, num_key_value_heads=4)),
    "mistral-gqa": lambda: tf.MistralForCausalLM(tf.MistralConfig(**COMMON, intermediate_size=128, num_key_value_heads=2, sliding_window=16)),
    "qwen2-gqa": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, intermediate_size=128, num_key_value_heads=2)),
    "gemma3-mqa": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**COMMON, intermediate_size=128, num_key_value_heads=1, head_dim=32,
                                                                 sliding_window=16, layer_types=["sliding_attention", "full_attention"])),
}


class PreRopeIdentity(KVMethod):
    pre_rope = True


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    torch.manual_seed(0)
    model = ARCHS[request.param]().eval()
    return model, model_info(model, request.param)


def _uniform(info, bits, **kw):
    return Uniform(UniformConfig(**kw), KVConfig(bits=bits), info)


def test_16_bit_is_exact_and_pre_rope_roundtrips(arch):
    model, info = arch
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        with patched(model, _uniform(info, 16)):
            out = model(ids)
        with patched(model, PreRopeIdentity(MethodConfig(name="x"), None, info)):
            pre = model(ids).logits
    assert isinstance(out.past_key_values, QuantizingCache)
    assert torch.equal(out.logits, ref)
    torch.testing.assert_close(pre, ref, atol=1e-5, rtol=1e-5)


def test_quantized_scoring_and_generation(arch):
    model, info = arch
    ids = torch.randint(0, 128, (1, 40))
    method = _uniform(info, 2, key_axis="channel", key_block=8, sink_tokens=1)
    with torch.no_grad():
        ref = model(ids).logits
        with patched(model, method):
            out = model(ids).logits
            gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert gen.shape == (1, 45)
