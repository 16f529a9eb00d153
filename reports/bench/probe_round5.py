"""Device probe of round 5 (issue 9): GQA (Llama-3-8B shape, 32 query / 8 KV heads) on the "gmma" path
(one program per KV head, the G query heads padded to 16 columns share each word tile through tl.dot; fields
as fp16 exact codes by the fp16x2 magic number; register prefetch of the next tile), launch variants, each
timed against fp16 SDPA in the same process and checked against the PyTorch reference.

    PYTHONPATH=. python reports/bench/probe_round5.py [T]      # -> probe_round5.log
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
    ref = ops.decode_attention(q, kv, impl="reference").float()
    for kw in variants:
        kw = dict(kw); tag = kw.pop("sass", None)
        try:
            out = ops.decode_attention(q, kv, **kw).float()
            rel = ((out - ref).norm() / ref.norm()).item()
            us = bench(lambda: ops.decode_attention(q, kv, **kw))
            ck = triton_ops._LAST_FMAG if kw.get("path") == "fmag" else None
            regs = f"regs {{ck.n_regs}} spills {{ck.n_spills}}" if ck is not None else ""
            print("T", hq, hkv, B, T, bits, kw or "auto:" + triton_ops._auto_path(kv, hq // hkv),
                  f"us {{us:.1f}} fp16 {{f16:.1f}} x{{f16 / us:.2f}} bw {{nbytes / us / 1e3 / 3019:.2f}} "
                  f"rel(ref) {{rel:.1e}}", regs, flush=True)
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
M = dict(path="gmma")
# one process per variant: an illegal address in one kernel poisons the CUDA context of its process
var = [dict(), dict(M), dict(M, asm=0), dict(M, asm=2), dict(M, vt=0), dict(M, tile=32), dict(M, tile=32, vt=0),
       dict(M, asm=0, tile=32, vt=0), dict(M, pref=0, num_stages=2), dict(M, tile=128)]
cases = [(32, 8, B, T, [(4, [v]), (2, [v])]) for v in var for B in (1, 8)]
for args in cases:
    r = subprocess.run([sys.executable, "-c", CASE.format(args=args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": "."})
    print(r.stdout.strip(), flush=True)
    if r.returncode:
        print("RC", r.returncode, args[:4], r.stderr.strip()[-300:], flush=True)
