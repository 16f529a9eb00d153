"""Profile decode steps of the e2e model (fp16 static cache vs packed 4-bit), top CUDA kernels."""
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from kvbench.kernels.cache import PACKED_ATTN, PackedCacheSpec, make_packed_cache, register_packed_attention

register_packed_attention()
B, T, L = 8, 32768, 4
cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=L,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=T + 512)
torch.set_default_dtype(torch.float16)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).eval()
torch.set_default_dtype(torch.float32)
prompt = torch.randint(0, 32000, (B, T), device="cuda")
for name in ("fp16-static", "packed-4bit"):
    if name == "fp16-static":
        model.set_attn_implementation("sdpa")
        cache = StaticCache(config=cfg, max_cache_len=T + 64)
    else:
        model.set_attn_implementation(PACKED_ATTN)
        cache = make_packed_cache(model.config, PackedCacheSpec(key_bits=4, value_bits=4))
    with torch.no_grad():
        pos = torch.arange(T, device="cuda")
        out = model(prompt, past_key_values=cache, use_cache=True, cache_position=pos)
        tok = out.logits[:, -1:].argmax(-1)
        del out
        for i in range(2):  # warm-up
            out = model(tok, past_key_values=cache, use_cache=True, cache_position=torch.tensor([T + i], device="cuda"))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(2, 5):
                out = model(tok, past_key_values=cache, use_cache=True,
                            cache_position=torch.tensor([T + i], device="cuda"))
            torch.cuda.synchronize()
    print(f"==== {name}: 3 decode steps, {L} layers, B={B}, T={T}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    del cache, out
    torch.cuda.empty_cache()
