"""Device probe of round 4 (issue 9): "fmag" with fp16x2 magic-number field pairs (mode 3: key fields
1024 + code, value fields exact codes via sub.f16x2; mode 4: exact codes for both), against the round-3
modes; GQA (Llama-3-8B shape) with G query heads per program (gb) at more warps / bigger tiles; each timed
against fp16 SDPA in the same process; numerics vs the PyTorch reference at batch 1, vs the automatic path
at batch 8. SASS of the MHA kernels -> $OUT/sass_*.txt (opcode histograms: reports/bench/sass_round4.txt).

    PYTHONPATH=. python reports/bench/probe_round4.py [T]      # -> probe_round4.log
"""
import os
import subprocess
import sys

CASE = r"""
import os, torch, triton.testing as tt
from kvbench.kernels import ops, triton_ops
from torch.nn.functional import scaled_dot_product_attention as sdpa
hq, hkv, B, T, cfgs = {args}
out_dir = os.environ.get("OUT", "")
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
        kw = dict(kw); tag = kw.pop("sass", None)
        try:
            out = ops.decode_attention(q, kv, **kw).float()
            rel = ((out - ref).norm() / ref.norm()).item()
            us = bench(lambda: ops.decode_attention(q, kv, **kw))
            ck = triton_ops._LAST_FMAG if kw.get("path") == "fmag" else None
            regs = f"regs {{ck.n_regs}} spills {{ck.n_spills}}" if ck is not None else ""
            print("T", hq, hkv, B, T, bits, kw or "auto:" + triton_ops._auto_path(kv, hq // hkv),
                  f"us {{us:.1f}} fp16 {{f16:.1f}} x{{f16 / us:.2f}} bw {{nbytes / us / 1e3 / 3019:.2f}} "
                  f"rel{{'(ref)' if B == 1 else '(auto)'}} {{rel:.1e}}", regs, flush=True)
            if tag and ck is not None and out_dir:
                try:
                    open(os.path.join(out_dir, f"sass_{{tag}}.txt"), "w").write(ck.asm["sass"])
                except Exception as e:
                    print("SASSFAIL", tag, type(e).__name__, str(e)[:200], flush=True)
        except Exception as e:
            print("FAIL", hq, hkv, B, bits, kw, type(e).__name__, str(e)[:400], flush=True)
    del kv, ref
    torch.cuda.empty_cache()
"""
T = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
F = dict(path="fmag")
mha1 = [
    (4, [dict(F, mode=3, sass="4b_mode3"), dict(F, mode=4), dict(F, mode=0, sass="4b_mode0"),
         dict(F, mode=3, tile=32, num_warps=2), dict(F, mode=3, maxnreg=168), dict(F, mode=0, maxnreg=168),
         dict(F, mode=3, maxnreg=128)]),
    (2, [dict(F, mode=3, sass="2b_mode3"), dict(F, mode=4), dict(F, mode=2, sass="2b_mode2"), dict(F, mode=2, maxnreg=168),
         dict(F, mode=3, maxnreg=168)]),
    (3, [dict(F, mode=3)]),
]
mha8 = [(4, [dict(F, mode=3), dict(F, mode=4), dict(F, mode=3, tile=32, num_warps=2), dict(F, mode=3, maxnreg=168),
             dict(F, mode=0, maxnreg=168)]),
        (2, [dict(F, mode=3), dict(F, mode=4), dict(F, mode=2, maxnreg=168)]), (3, [dict(F, mode=3)])]
G4 = dict(F, gb=4)
gqa = [
    (4, [dict(G4, mode=3, tile=32, num_warps=4), dict(G4, mode=3, tile=64, num_warps=4),
         dict(G4, mode=3, tile=32, num_warps=4, vec=2), dict(G4, mode=3, tile=16, num_warps=2, vec=2),
         dict(F, gb=2, mode=3, tile=16, num_warps=2), dict(G4, mode=0, tile=32, num_warps=4)]),
    (2, [dict(G4, mode=3, tile=32, num_warps=4), dict(G4, mode=3, tile=64, num_warps=4),
         dict(G4, mode=2, tile=32, num_warps=4), dict(F, gb=1, mode=3)]),
]
cases = [(32, 32, 1, T, mha1), (32, 32, 8, T, mha8), (32, 8, 1, T, gqa), (32, 8, 8, T, gqa)]
for args in cases:
    r = subprocess.run([sys.executable, "-c", CASE.format(args=args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": "."})
    print(r.stdout.strip(), flush=True)
    if r.returncode:
        print("RC", r.returncode, args[:4], r.stderr.strip()[-1500:], flush=True)
