"""Device probe: does a decode-attention path run and agree with the reference (each case in its own process)."""
import os
import subprocess
import sys

CASE = """
import torch, triton.testing as tt
from kvbench.kernels import ops
bits, path, tile, nw, B, T = {args}
torch.manual_seed(0)
k = torch.randn(B, 32, T, 128, dtype=torch.float16, device="cuda"); v = torch.randn_like(k)
q = torch.randn(B, 32, 128, dtype=torch.float16, device="cuda")
kv = ops.build_packed_kv(k, v, bits, bits, 128, 128, n_recent=128)
del k, v
out = ops.decode_attention(q, kv, path=path, tile=tile, num_warps=nw); torch.cuda.synchronize()
rel = None
if T <= 16384:
    ref = ops.decode_attention(q, kv, impl="reference")
    rel = ((out.float()-ref.float()).norm()/ref.float().norm()).item()
us = tt.do_bench(lambda: ops.decode_attention(q, kv, path=path, tile=tile, num_warps=nw), return_mode="median") * 1e3
print("OK rel", rel, "us", round(us, 1))
"""
cases = [(b, p, 64, 4, B, T) for b in (2, 3) for p in ("mma", "dot") for (B, T) in ((1, 4096), (8, 65536))]
for args in cases:
    r = subprocess.run([sys.executable, "-c", CASE.format(args=args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": "."})
    print(args, r.stdout.strip() or r.stderr.strip().splitlines()[-1][:300], flush=True)
