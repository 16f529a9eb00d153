"""Device probe of the CUDA-core "fma" decode path: numerics vs the reference, then a launch-parameter
sweep against fp16 SDPA in the same process (one subprocess per shape, so a fault cannot hide others).

    PYTHONPATH=. python reports/bench/probe_fma.py [quick]
"""
import os
import subprocess
import sys

CASE = r"""
import torch, triton.testing as tt, json
from kvbench.kernels import ops, triton_ops
from torch.nn.functional import scaled_dot_product_attention as sdpa
hq, hkv, B, T, bits_list, cfgs = {args}
def bench(fn):
    return tt.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3
torch.manual_seed(0)
if T <= 16384:  # numerics only
    for bits in bits_list:
        k = torch.randn(B, hkv, T, 128, dtype=torch.float16, device="cuda"); v = torch.randn_like(k)
        q = torch.randn(B, hq, 128, dtype=torch.float16, device="cuda")
        kv = ops.build_packed_kv(k, v, bits, bits, 128, 128, n_sink=4, n_recent=124)
        ref = ops.decode_attention(q, kv, impl="reference").float()
        for kw in cfgs:
            out = ops.decode_attention(q, kv, path="fma", **kw).float()
            rel = ((out - ref).norm() / ref.norm()).item()
            print("NUM", hq, hkv, B, T, bits, kw, "rel", f"{{rel:.2e}}", flush=True)
    raise SystemExit
k = torch.randn(B, hkv, T, 128, dtype=torch.float16, device="cuda"); v = torch.randn_like(k)
q = torch.randn(B, hq, 128, dtype=torch.float16, device="cuda")
f16 = bench(lambda: sdpa(q[:, :, None], k, v, enable_gqa=hq != hkv))
for bits in bits_list:
    kv = ops.build_packed_kv(k, v, bits, bits, 128, 128, n_recent=128)
    nbytes = sum(t.numel() * t.element_size() for t in (kv.k_words, kv.v_words, kv.k_scale, kv.k_zero, kv.v_scale, kv.v_zero))
    for kw in cfgs:
        try:
            us = bench(lambda: ops.decode_attention(q, kv, **kw))
            print("T", hq, hkv, B, T, bits, kw, f"us {{us:.1f}} fp16 {{f16:.1f}} x{{f16 / us:.2f}} GBps {{nbytes / us / 1e3:.0f}}", flush=True)
        except Exception as e:
            print("FAIL", bits, kw, type(e).__name__, str(e)[:200], flush=True)
    del kv
"""
quick = len(sys.argv) > 1 and sys.argv[1] == "quick"
F = dict(path="fma")
sweep = [dict(F, tile=t, num_warps=w) for t, w in ((8, 1), (16, 1), (32, 1), (16, 2), (32, 2), (32, 4), (64, 4))]
sweep += [dict(F, tile=16, num_warps=1, lowp=11), dict(F, tile=16, num_warps=1, num_stages=2),
          dict(F, tile=16, num_warps=1, num_stages=4), dict(F, tile=16, num_warps=1, waves=16),
          dict(F, tile=16, num_warps=1, waves=4), dict(F, tile=16, num_warps=1, vec=2)]
num = [dict(tile=16, num_warps=1), dict(tile=32, num_warps=2), dict(tile=64, num_warps=4)]
cases = [(32, 32, 2, 8192, [2, 3, 4], num), (32, 8, 2, 8192, [2, 3, 4], num)]
cases += [(32, 32, 8, 65536, [4, 2], sweep + [dict(path="mma")]), (32, 8, 1, 131072, [4, 2], sweep),
          (32, 8, 8, 65536, [4], sweep[:7])]
if quick:
    cases = cases[:2] + [(32, 32, 8, 65536, [4, 2], sweep[:3] + [dict(path="mma")])]
for args in cases:
    r = subprocess.run([sys.executable, "-c", CASE.format(args=args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": "."})
    print(r.stdout.strip())
    if r.returncode:
        print("RC", r.returncode, args[:4], r.stderr.strip()[-1500:], flush=True)
