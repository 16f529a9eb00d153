"""Device probe of round 3 (issue 9): "fmag" field extraction by byte fields + PRMT (mode 1: emulated in
Triton, mode 2: inline PTX ``prmt.b32``), 3-bit codes (2 + 1 slices) on "fmag", GQA with the new extraction,
each timed against fp16 SDPA in the same process; numerics vs the PyTorch reference at batch 1 and vs the
automatic path at batch 8; a partial last tile (n_packed not a multiple of the tile) with NaN garbage past it.

    PYTHONPATH=. python reports/bench/probe_round3.py [T]      # -> probe_round3.log
"""
import os
import subprocess
import sys

CASE = r"""
import dataclasses, torch, triton.testing as tt
from kvbench.kernels import ops, triton_ops
from torch.nn.functional import scaled_dot_product_attention as sdpa
hq, hkv, B, T, cfgs = {args}
def bench(fn):
    return tt.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
torch.manual_seed(0)
k = torch.randn(B, hkv, T, 128, dtype=torch.float16, device="cuda"); v = torch.randn_like(k)
q = torch.randn(B, hq, 128, dtype=torch.float16, device="cuda")
f16 = bench(lambda: sdpa(q[:, :, None], k, v, enable_gqa=hq != hkv))
print("FP16", hq, hkv, B, T, f"{{f16:.1f}}us", flush=True)
for bits, variants in cfgs:
    kv = ops.build_packed_kv(k, v, bits, bits, 128, 128, n_recent=128)
    nbytes = sum(t.numel() * t.element_size() for t in (kv.k_words, kv.v_words, kv.k_scale, kv.k_zero, kv.v_scale, kv.v_zero))
    nbytes += 2 * 128 * 128 * 2 * B * hkv
    ref = ops.decode_attention(q, kv, impl="reference").float() if B == 1 else ops.decode_attention(q, kv).float()
    for kw in [dict()] + variants:
        try:
            out = ops.decode_attention(q, kv, **kw).float()
            rel = ((out - ref).norm() / ref.norm()).item()
            us = bench(lambda: ops.decode_attention(q, kv, **kw))
            ck = triton_ops._LAST_FMAG if kw.get("path") == "fmag" else None
            regs = f"regs {{ck.n_regs}} spills {{ck.n_spills}}" if ck is not None else ""
            print("T", hq, hkv, B, T, bits, kw or "auto:" + triton_ops._auto_path(kv, hq // hkv),
                  f"us {{us:.1f}} fp16 {{f16:.1f}} x{{f16 / us:.2f}} bw {{nbytes / us / 1e3 / 3019:.2f}} "
                  f"rel{{'(ref)' if B == 1 else '(auto)'}} {{rel:.1e}}", regs, flush=True)
        except Exception as e:
            print("FAIL", hq, hkv, B, bits, kw, type(e).__name__, str(e)[:400], flush=True)
    del kv, ref
    torch.cuda.empty_cache()
"""
PARTIAL = r"""
import dataclasses, torch
from kvbench.kernels import ops, triton_ops
torch.manual_seed(1)
for hq, hkv, bits, kws in {args}:
    k = torch.randn(1, hkv, 8192 + 16, 128, dtype=torch.float16, device="cuda"); v = torch.randn_like(k)
    q = torch.randn(1, hq, 128, dtype=torch.float16, device="cuda")
    full = ops.build_packed_kv(k, v, bits, bits, 128, 128, n_recent=16)
    vs = full.v_scale.clone(); vs[:, :, 8000:] = float("nan")
    kv = dataclasses.replace(full, n_packed=8000 - 5, v_scale=vs)  # 8000-5: not a multiple of 8/16/64/128
    ref = ops.decode_attention(q, kv, impl="reference").float()
    for kw in kws:
        try:
            out = ops.decode_attention(q, kv, **kw).float()
            rel = ((out - ref).norm() / ref.norm()).item()
            print("PARTIAL", hq, hkv, bits, kw or "auto:" + triton_ops._auto_path(kv, hq // hkv), f"rel {{rel:.1e}}",
                  "finite" if torch.isfinite(out).all() else "NONFINITE", flush=True)
        except Exception as e:
            print("PFAIL", hq, hkv, bits, kw, type(e).__name__, str(e)[:300], flush=True)
"""
T = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
F = dict(path="fmag")
mha = [
    (4, [dict(F, mode=1), dict(F, mode=2), dict(F, mode=2, tile=32, num_warps=2)]),
    (2, [dict(F, mode=1), dict(F, mode=2), dict(F, mode=2, tile=32, num_warps=2)]),
    (3, [dict(F, mode=0), dict(F, mode=2), dict(F, mode=2, tile=16, num_warps=2), dict(F, mode=2, tile=16, vec=4)]),
]
gqa = [
    (4, [dict(F, mode=2, gb=1, tile=16, num_warps=1), dict(F, mode=2, gb=4, tile=16, num_warps=2),
         dict(F, mode=2, gb=2, tile=16, num_warps=2)]),
    (2, [dict(F, mode=2, gb=1, tile=16, num_warps=1), dict(F, mode=2, gb=4, tile=16, num_warps=2, vec=2)]),
    (3, [dict(F, mode=2, gb=1)]),
]
partial = [(32, 32, 4, [dict(), dict(F, mode=2)]), (32, 32, 2, [dict(F, mode=2)]),
           (32, 32, 3, [dict(), dict(F, mode=2)]), (32, 8, 4, [dict(), dict(F, mode=2, gb=1)]),
           (32, 8, 2, [dict()])]
r = subprocess.run([sys.executable, "-c", PARTIAL.format(args=partial)], capture_output=True, text=True,
                   env={**os.environ, "PYTHONPATH": "."})
print(r.stdout.strip(), flush=True)
if r.returncode:
    print("RC partial", r.stderr.strip()[-1500:], flush=True)
cases = [(32, 32, 1, T, mha), (32, 32, 8, T, mha), (32, 8, 1, T, gqa), (32, 8, 8, T, gqa)]
for args in cases:
    r = subprocess.run([sys.executable, "-c", CASE.format(args=args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": "."})
    print(r.stdout.strip(), flush=True)
    if r.returncode:
        print("RC", r.returncode, args[:4], r.stderr.strip()[-1500:], flush=True)
