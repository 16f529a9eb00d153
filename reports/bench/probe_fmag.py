"""Device probe of the grouped CUDA-core path "fmag" (round 2): GQA head sharing and register prefetch,
timed against fp16 SDPA and the previous automatic path in the same process, numerics vs the reference
at batch 1 (one subprocess per shape/batch, so a fault cannot hide the others).

    PYTHONPATH=. python reports/bench/probe_fmag.py [T] [a|b]

Round a (probe_fmag_round2a.log): MHA tile/warps/prefetch, GQA with 32 channels per thread (spills).
Round b (probe_fmag_round2b.log): two tiles in flight, GQA with 16 channels per thread (vec 2 at 4 bits,
vec 1 at 2 bits).
"""
import os
import subprocess
import sys

CASE = r"""
import torch, triton.testing as tt
from kvbench.kernels import ops, triton_ops
from torch.nn.functional import scaled_dot_product_attention as sdpa
hq, hkv, B, T, bits_list, cfgs = {args}
def bench(fn):
    return tt.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3
torch.manual_seed(0)
k = torch.randn(B, hkv, T, 128, dtype=torch.float16, device="cuda"); v = torch.randn_like(k)
q = torch.randn(B, hq, 128, dtype=torch.float16, device="cuda")
f16 = bench(lambda: sdpa(q[:, :, None], k, v, enable_gqa=hq != hkv))
print("FP16", hq, hkv, B, T, f"{{f16:.1f}}us", flush=True)
for bits in bits_list:
    kv = ops.build_packed_kv(k, v, bits, bits, 128, 128, n_recent=128)
    nbytes = sum(t.numel() * t.element_size() for t in (kv.k_words, kv.v_words, kv.k_scale, kv.k_zero, kv.v_scale, kv.v_zero))
    ref = ops.decode_attention(q, kv, impl="reference").float() if B == 1 else None
    for kw in [dict(), dict(path="fma")] + cfgs.get(bits, cfgs.get(0, [])):
        try:
            out = ops.decode_attention(q, kv, **kw).float()
            rel = ((out - ref).norm() / ref.norm()).item() if ref is not None else float("nan")
            us = bench(lambda: ops.decode_attention(q, kv, **kw))
            ck = triton_ops._LAST_FMAG if kw.get("path") == "fmag" else None
            regs = f"regs {{ck.n_regs}} spills {{ck.n_spills}}" if ck is not None else ""
            print("T", hq, hkv, B, T, bits, kw or "auto", f"us {{us:.1f}} fp16 {{f16:.1f}} x{{f16 / us:.2f}} "
                  f"bw {{nbytes / us / 1e3 / 3008:.2f}} rel {{rel:.1e}}", regs, flush=True)
        except Exception as e:
            print("FAIL", hq, hkv, B, bits, kw, type(e).__name__, str(e)[:300], flush=True)
    del kv
"""
T = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
ROUND = sys.argv[2] if len(sys.argv) > 2 else "b"
F = dict(path="fmag")
mha = [dict(F, tile=16, num_warps=1, pref=1), dict(F, tile=16, num_warps=1, pref=0), dict(F, tile=32, num_warps=1, pref=1),
       dict(F, tile=32, num_warps=2, pref=1), dict(F, tile=8, num_warps=1, pref=1)]
gqa = [dict(F, tile=t, num_warps=w, pref=p, gb=g) for t, w, p, g in
       ((16, 2, 1, 4), (16, 2, 0, 4), (8, 1, 1, 4), (16, 1, 1, 4), (32, 4, 1, 4), (64, 4, 1, 4), (32, 2, 1, 4),
        (16, 2, 1, 2), (16, 1, 1, 1))]
gqa += [dict(F, tile=16, num_warps=2, pref=1, gb=4, vec=4), dict(F, tile=32, num_warps=2, pref=1, gb=4, vec=2)]
mha, gqa = {0: mha}, {0: gqa}
if ROUND == "b":
    mha = {0: [dict(F, tile=t, num_warps=w, pref=p, vec=v) for t, w, p, v in
               ((16, 1, 1, 4), (16, 1, 2, 4), (32, 2, 1, 4), (32, 2, 2, 4), (8, 1, 2, 4), (8, 2, 2, 2), (16, 4, 1, 2))]}
    gqa = {b: [dict(F, tile=t, num_warps=w, gb=g, pref=p, vec=v) for t, w, g, p, v in
               ((8, 2, 4, 1, v1), (8, 2, 4, 2, v1), (16, 4, 4, 1, v1), (4, 1, 4, 1, v1), (8, 2, 2, 1, v1),
                (8, 1, 4, 1, v1 * 2), (8, 1, 4, 2, v1 * 2), (16, 2, 2, 2, v1 * 2))] for b, v1 in ((4, 2), (2, 1))}
cases = [(32, 32, 1, T, [4, 2], mha), (32, 8, 1, T, [4, 2], gqa), (32, 32, 8, T, [4, 2], mha), (32, 8, 8, T, [4, 2], gqa)]
for args in cases:
    r = subprocess.run([sys.executable, "-c", CASE.format(args=args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": "."})
    print(r.stdout.strip(), flush=True)
    if r.returncode:
        print("RC", r.returncode, args[:4], r.stderr.strip()[-1500:], flush=True)
