"""Device probe: which decode-attention path/config runs (each case in its own process)."""
import subprocess
import sys

CASE = """
import torch, sys
from kvbench.kernels import ops
bits, path, tile, nw, B, T = {args}
torch.manual_seed(0)
k = torch.randn(B, 32, T, 128, dtype=torch.float16, device="cuda"); v = torch.randn_like(k)
q = torch.randn(B, 32, 128, dtype=torch.float16, device="cuda")
kv = ops.build_packed_kv(k, v, bits, bits, 128, 128, n_recent=128)
torch.cuda.synchronize()
out = ops.decode_attention(q, kv, path=path, tile=tile, num_warps=nw); torch.cuda.synchronize()
ref = ops.decode_attention(q, kv, impl="reference")
print("OK", bits, path, tile, nw, B, T, ((out.float()-ref.float()).norm()/ref.float().norm()).item())
"""
for args in [(4, "mma", 64, 4, 1, 4096), (2, "mma", 64, 4, 1, 4096), (3, "mma", 64, 4, 1, 4096), (2, "mma", 128, 4, 1, 4096),
             (4, "mma", 128, 4, 8, 16384), (2, "dot", 128, 4, 1, 4096), (2, "fma", 64, 4, 1, 4096), (4, "mma", 64, 4, 8, 16384)]:
    r = subprocess.run([sys.executable, "-c", CASE.format(args=args)], capture_output=True, text=True,
                       env={"CUDA_LAUNCH_BLOCKING": "1", **__import__("os").environ})
    print(args, r.stdout.strip() or r.stderr.strip().splitlines()[-1][:300], flush=True)
