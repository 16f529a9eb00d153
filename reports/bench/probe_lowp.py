"""Device probe: precision (B=1, 128k tokens, vs the reference) and time of the fma path per value field placement."""
import torch, triton.testing as tt
from kvbench.kernels import ops
from torch.nn.functional import scaled_dot_product_attention as sdpa
for B, T in ((1, 131072), (8, 65536)):
    torch.manual_seed(0)
    k = torch.randn(B, 32, T, 128, dtype=torch.float16, device="cuda"); v = torch.randn_like(k)
    q = torch.randn(B, 32, 128, dtype=torch.float16, device="cuda")
    f16 = tt.do_bench(lambda: sdpa(q[:, :, None], k, v), return_mode="median") * 1e3
    for bits in (2, 3, 4):
        kv = ops.build_packed_kv(k, v, bits, bits, 128, 128, n_recent=128)
        ref = ops.decode_attention(q, kv, impl="reference").float() if B == 1 else None
        for lv in (11, 15, 19):
            out = ops.decode_attention(q, kv, path="fma", lowp_v=lv).float()
            rel = ((out - ref).norm() / ref.norm()).item() if ref is not None else None
            us = tt.do_bench(lambda: ops.decode_attention(q, kv, path="fma", lowp_v=lv), return_mode="median") * 1e3
            print(B, T, bits, "lowp_v", lv, "rel", rel, f"us {us:.1f} x{f16 / us:.2f}", flush=True)
        del kv, ref
        torch.cuda.empty_cache()
    del k, v
