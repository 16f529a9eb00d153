"""Device probe: mma path tile 64 vs 128 (4-bit), numerics and time (each case in its own process)."""
import os
import subprocess
import sys

CASE = """
import torch, triton.testing as tt
from kvbench.kernels import ops
from torch.nn.functional import scaled_dot_product_attention as sdpa
hq, hkv, tile, nw, B, T = {args}
torch.manual_seed(0)
k = torch.randn(B, hkv, T, 128, dtype=torch.float16, device="cuda"); v = torch.randn_like(k)
q = torch.randn(B, hq, 128, dtype=torch.float16, device="cuda")
f16 = tt.do_bench(lambda: sdpa(q[:, :, None], k, v, enable_gqa=hq != hkv), return_mode="median") * 1e3
kv = ops.build_packed_kv(k, v, 4, 4, 128, 128, n_recent=128)
del k, v
out = ops.decode_attention(q, kv, path="mma", tile=tile, num_warps=nw); torch.cuda.synchronize()
rel = None
if B * T <= 8 * 16384:
    ref = ops.decode_attention(q, kv, impl="reference")
    rel = ((out.float()-ref.float()).norm()/ref.float().norm()).item()
us = tt.do_bench(lambda: ops.decode_attention(q, kv, path="mma", tile=tile, num_warps=nw), return_mode="median") * 1e3
print("OK rel", rel, "us", round(us, 1), "fp16", round(f16, 1), "x", round(f16 / us, 3))
"""
cases = [(32, 32, t, 4, B, T) for t in (64, 128) for (B, T) in ((8, 16384), (8, 65536))]
cases += [(32, 8, t, 4, 1, 131072) for t in (64, 128)] + [(32, 32, 128, 8, 8, 65536)]
for args in cases:
    r = subprocess.run([sys.executable, "-c", CASE.format(args=args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": "."})
    print(args, r.stdout.strip() or r.stderr.strip().splitlines()[-1][:300], flush=True)
