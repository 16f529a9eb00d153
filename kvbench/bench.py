"""GPU benchmark of the packed KV-cache kernels (a benchmark, not a test).

``python -m kvbench.bench --out reports/bench`` measures, on the current CUDA device:

* the device-to-device copy bandwidth (bytes read + written per second), the ceiling;
* decode attention (one query token) over ``T`` cached tokens: the packed Triton kernel at 2/3/4 bits
  against fp16 ``scaled_dot_product_attention`` with torch's default backend choice and with the
  flash backend, for Llama-2-7B (32/32 heads) and Llama-3-8B (32/8 heads) shapes, head_dim 128;
* end-to-end ``generate`` decode tokens/s at a long context on a random-weight Llama-2-7B-shaped model
  (fewer layers, so that the fp16 cache fits) with the fp16 DynamicCache/StaticCache and the packed cache.

Writes ``decode_attention.json``/``.md``, ``e2e.json``, ``copy_bandwidth.json`` (and a PNG plot when
matplotlib is there; ``--plot-only DIR`` redraws it from the JSON on any machine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # (H_q, H_kv, D)


def _bench(fn, graph: bool = False) -> float:
    """Median time of ``fn`` in microseconds (L2 flushed between runs unless ``graph``)."""
    import triton.testing as tt

    if graph:
        return tt.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
    return tt.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    x = torch.randn(n, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    us = _bench(lambda: y.copy_(x))
    del x, y
    return 2 * n * 2 / (us * 1e-6)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _packed_bytes_read(kv) -> int:
    """Bytes the decode kernel must read: valid codes, scales, zeros, fp16 tokens, q ignored."""
    n, nb = kv.n_packed, kv.n_packed // kv.key_block
    return _nbytes(
        kv.k_words[:, :, :n], kv.v_words[:, :, :n], kv.k_scale[:, :, :nb], kv.k_zero[:, :, :nb],
        kv.v_scale[:, :, :n], kv.v_zero[:, :, :n], kv.sink_k[:, :, : kv.n_sink], kv.sink_v[:, :, : kv.n_sink],
        kv.recent_k[:, :, : kv.n_recent], kv.recent_v[:, :, : kv.n_recent],
    )


def bench_decode_attention(args, copy_bw: float, gpu: str) -> list[dict]:
    """Decode-attention latency of packed kernels vs fp16 SDPA; one record per (shape, batch, T, bits)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from kvbench.kernels import ops, triton_ops

    records = []
    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        for batch in args.batch:
            for T in args.T:
                torch.manual_seed(0)
                try:
                    k = torch.randn(batch, hkv, T, d, dtype=torch.float16, device="cuda")
                    v = torch.randn_like(k)
                except torch.OutOfMemoryError:
                    print(f"skip {shape} B={batch} T={T}: out of memory")
                    continue
                q = torch.randn(batch, hq, d, dtype=torch.float16, device="cuda")
                q4 = q[:, :, None]  # (B, H_q, 1, D)
                gqa = hq != hkv
                fp16_us = _bench(lambda: sdpa(q4, k, v, enable_gqa=gqa))
                try:
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        flash_us = _bench(lambda: sdpa(q4, k, v, enable_gqa=gqa))
                except RuntimeError as e:  # flash may refuse a shape
                    flash_us, _ = None, print(f"flash backend failed: {e}")
                fp16_bytes = _nbytes(k, v)
                for bits in args.bits:
                    kv = ops.build_packed_kv(
                        k, v, bits, bits, args.key_block, args.value_group, n_sink=0,
                        n_recent=args.recent, impl="triton",
                    )
                    fn = lambda: ops.decode_attention(q, kv, tile=args.tile)  # noqa: E731
                    out = fn()
                    if batch * T <= 131072:  # numerics check against the reference twin
                        ref = ops.decode_attention(q, kv, impl="reference")
                        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    else:
                        rel = None
                    us = _bench(fn)
                    g_us = _bench(fn, graph=True) if args.graph else None
                    nbytes = _packed_bytes_read(kv)
                    best = min(x for x in (fp16_us, flash_us) if x is not None)
                    rec = dict(
                        gpu=gpu, shape=shape, h_q=hq, h_kv=hkv, head_dim=d, bits=bits, T=T, batch=batch,
                        path=triton_ops._auto_path(kv, hq // hkv),
                        kernel_us=round(us, 2), kernel_graph_us=None if g_us is None else round(g_us, 2),
                        fp16_us=round(fp16_us, 2), fp16_flash_us=None if flash_us is None else round(flash_us, 2),
                        speedup=round(fp16_us / us, 3), speedup_vs_best_fp16=round(best / us, 3),
                        packed_bytes=nbytes, fp16_bytes=fp16_bytes,
                        kernel_GBps=round(nbytes / us / 1e3, 1), fp16_GBps=round(fp16_bytes / fp16_us / 1e3, 1),
                        bandwidth_frac=round(nbytes / (us * 1e-6) / copy_bw, 3),
                        fp16_bandwidth_frac=round(fp16_bytes / (fp16_us * 1e-6) / copy_bw, 3),
                        copy_GBps=round(copy_bw / 1e9, 1), rel_err_vs_reference=rel,
                        key_block=args.key_block, value_group=args.value_group, recent=args.recent, tile=args.tile,
                    )
                    records.append(rec)
                    print(
                        f"{shape:9s} B={batch} T={T:6d} {bits}b {rec['path']:3s} kernel {us:8.1f}us  fp16 {fp16_us:8.1f}us "
                        f"flash {flash_us or float('nan'):8.1f}us  x{rec['speedup']:.2f}  "
                        f"bw {rec['bandwidth_frac']:.2f} (fp16 {rec['fp16_bandwidth_frac']:.2f})  rel {rel}",
                        flush=True,
                    )
                    del kv
                del k, v
                torch.cuda.empty_cache()
    return records


def tune(args) -> list[dict]:
    """Launch-parameter sweep at a few long-context shapes (for the profile notes)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from kvbench.kernels import ops

    out = []
    for shape, batch, T, bits in [("llama2-7b", 8, 65536, 4), ("llama2-7b", 8, 65536, 2), ("llama3-8b", 1, 131072, 4)]:
        hq, hkv, d = SHAPES[shape]
        k = torch.randn(batch, hkv, T, d, dtype=torch.float16, device="cuda")
        v = torch.randn_like(k)
        q = torch.randn(batch, hq, d, dtype=torch.float16, device="cuda")
        fp16_us = _bench(lambda: sdpa(q[:, :, None], k, v, enable_gqa=hq != hkv))
        kv = ops.build_packed_kv(k, v, bits, bits, args.key_block, args.value_group, n_recent=args.recent)
        del k, v
        nbytes = _packed_bytes_read(kv)
        cfgs = [dict(path="dot", tile=128, num_warps=4)] + ([dict(path="mma", tile=64, num_warps=4)] if bits == 4 else [])
        cfgs += [dict(path="fma", tile=t, num_warps=w, waves=wv) for t, w in ((16, 1), (32, 1), (32, 2)) for wv in (8, 16, 32)]
        for kw in cfgs:
            try:
                us = _bench(lambda: ops.decode_attention(q, kv, **kw))
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is skipped
                print("tune fail", kw, type(e).__name__, str(e)[:200])
                continue
            out.append(dict(shape=shape, batch=batch, T=T, bits=bits, **kw, us=round(us, 2),
                            fp16_us=round(fp16_us, 2), speedup=round(fp16_us / us, 3), GBps=round(nbytes / us / 1e3, 1)))
            print("tune", out[-1], flush=True)
        del kv
        torch.cuda.empty_cache()
    return out


def write_markdown(records: list[dict], path: Path, copy_bw: float, gpu: str) -> None:
    lines = [
        f"# Decode attention, packed kernel vs fp16 SDPA ({gpu})",
        "",
        f"Measured copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write). `speedup` = fp16 SDPA (default "
        "backend) time / kernel time; `bw frac` = packed bytes read per second / copy bandwidth.",
        "",
        "| shape | B | T | bits | kernel us | fp16 us | flash us | speedup | vs best fp16 | bw frac | fp16 bw frac |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['T']} | {r['bits']} | {r['kernel_us']} | {r['fp16_us']} | "
            f"{r['fp16_flash_us']} | {r['speedup']} | {r['speedup_vs_best_fp16']} | {r['bandwidth_frac']} | "
            f"{r['fp16_bandwidth_frac']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(out_dir: Path) -> None:
    """``decode_attention.png`` from ``decode_attention.json`` (speedup vs T per shape/batch/bits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = json.loads((out_dir / "decode_attention.json").read_text())
    keys = sorted({(r["shape"], r["batch"]) for r in recs})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, (shape, b) in zip(axes[0], keys):
        for bits in sorted({r["bits"] for r in recs}):
            rs = sorted((r for r in recs if r["shape"] == shape and r["batch"] == b and r["bits"] == bits),
                        key=lambda r: r["T"])
            ax.plot([r["T"] for r in rs], [r["speedup"] for r in rs], marker="o", label=f"{bits}-bit")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape}, batch {b}")
        ax.set_xlabel("context T")
        ax.set_ylabel("speedup vs fp16 SDPA")
        ax.legend()
    fig.suptitle(f"decode attention on {recs[0]['gpu']}")
    fig.tight_layout()
    fig.savefig(out_dir / "decode_attention.png", dpi=120)


class _StepTimer:
    """A generate() streamer that records a synchronized timestamp at every put (prompt, then tokens)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_e2e(args, gpu: str, copy_bw: float) -> dict:
    """Decode tokens/s of ``generate`` at a long context on a random-weight Llama-2-7B-shaped model.

    The model keeps the 7B layer shape (hidden 4096, 32 heads, 32 KV heads, MLP 11008) with only
    ``--e2e-layers`` layers so that the fp16 cache of the baseline fits on one GPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbench.kernels.cache import PACKED_ATTN, PackedCacheSpec, make_packed_cache, register_packed_attention

    register_packed_attention()
    B, T, N = args.e2e_batch, args.e2e_context, args.e2e_new
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.e2e_layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=T + N + 256)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    prompt = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    mask = torch.ones_like(prompt)
    try:
        from transformers import QuantizedCache

        QuantizedCache(backend="quanto", config=cfg, nbits=4)
        qc_status = "constructed (not timed)"
    except Exception as e:  # noqa: BLE001 - record why the comparison is missing
        qc_status = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
    runs = []
    configs = [("fp16-dynamic", None), ("fp16-static", None)] + [(f"packed-{b}bit", b) for b in args.e2e_bits]
    for name, bits in configs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, attention_mask=mask, disable_compile=True)
        cache = None
        if bits is None:
            model.set_attn_implementation("sdpa")
            if name == "fp16-static":
                kw["cache_implementation"] = "static"
        else:
            model.set_attn_implementation(PACKED_ATTN)
            spec = PackedCacheSpec(key_bits=bits, value_bits=bits, value_group_size=args.value_group,
                                   key_block=args.key_block, recent_window=args.recent)
            cache = make_packed_cache(model.config, spec)
            kw["past_key_values"] = cache
        timer = _StepTimer()
        try:
            with torch.no_grad():  # warm-up on a short prompt: Triton JIT / cuDNN plans stay out of the timing
                wkw = dict(kw, max_new_tokens=4, min_new_tokens=4, attention_mask=mask[:, :1024])
                if bits is not None:
                    wkw["past_key_values"] = make_packed_cache(model.config, spec)
                model.generate(prompt[:, :1024], **wkw)
                out = model.generate(prompt, streamer=timer, return_dict_in_generate=True, **kw)
        except torch.OutOfMemoryError as e:
            runs.append(dict(name=name, error=f"OOM: {str(e)[:120]}"))
            print(name, "OOM", flush=True)
            continue
        t = timer.times  # [start, after prefill (token 1), ..., after token N]
        pkv = out.past_key_values
        if cache is not None:
            kv_bytes = cache.nbytes()
        else:
            kv_bytes = sum(x.numel() * x.element_size() for lay in pkv.layers for x in (lay.keys, lay.values))
        rec = dict(
            name=name, bits=bits, prefill_s=round(t[1] - t[0], 3),
            decode_tok_s=round(B * (len(t) - 2) / (t[-1] - t[1]), 1),
            decode_ms_per_step=round(1e3 * (t[-1] - t[1]) / (len(t) - 2), 3),
            kv_bytes=kv_bytes, kv_bytes_per_token_per_layer=round(kv_bytes / (B * (T + N - 1)) / args.e2e_layers, 1),
            peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
        )
        runs.append(rec)
        print("e2e", rec, flush=True)
        del out, pkv, cache
    base = next((r for r in runs if r["name"] == "fp16-dynamic" and "error" not in r), None)
    best = [r for r in runs if r["name"].startswith("fp16") and "error" not in r]
    best = min(best, key=lambda r: r["decode_ms_per_step"]) if best else None
    for r in runs:
        if "error" in r or base is None:
            continue
        r["speedup_vs_fp16_dynamic"] = round(base["decode_ms_per_step"] / r["decode_ms_per_step"], 3)
        r["speedup_vs_best_fp16"] = round(best["decode_ms_per_step"] / r["decode_ms_per_step"], 3)
        r["kv_mem_reduction_vs_fp16"] = round(base["kv_bytes"] / r["kv_bytes"], 3)
    return dict(gpu=gpu, copy_GBps=round(copy_bw / 1e9, 1), model="random-weight Llama-2-7B shape",
                layers=args.e2e_layers, batch=B, context=T, new_tokens=N, key_block=args.key_block,
                value_group=args.value_group, recent=args.recent, quantized_cache=qc_status, runs=runs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("reports/bench"))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=[4096, 16384, 65536, 131072])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--key-block", type=int, default=128)
    p.add_argument("--value-group", type=int, default=128)
    p.add_argument("--recent", type=int, default=128, help="fp16 recent-window tokens (part of T)")
    p.add_argument("--tile", type=int, default=None)
    p.add_argument("--graph", action="store_true", help="also time the kernel under a CUDA graph")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--skip-micro", action="store_true")
    p.add_argument("--e2e", action="store_true", help="run the end-to-end generate benchmark")
    p.add_argument("--e2e-layers", type=int, default=8)
    p.add_argument("--e2e-context", type=int, default=32768)
    p.add_argument("--e2e-batch", type=int, default=8)
    p.add_argument("--e2e-new", type=int, default=32)
    p.add_argument("--e2e-bits", nargs="+", type=int, default=[4, 2])
    p.add_argument("--plot-only", type=Path, default=None)
    args = p.parse_args(argv)
    if args.plot_only:
        plot(args.plot_only)
        return
    if not torch.cuda.is_available():
        raise SystemExit("kvbench.bench needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    (args.out / "copy_bandwidth.json").write_text(json.dumps({"gpu": gpu, "copy_Bps": bw}, indent=1))
    print(f"{gpu}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    if args.tune:
        t = tune(args)
        (args.out / "tune.json").write_text(json.dumps(t, indent=1))
    if not args.skip_micro:
        recs = bench_decode_attention(args, bw, gpu)
        (args.out / "decode_attention.json").write_text(json.dumps(recs, indent=1))
        write_markdown(recs, args.out / "decode_attention.md", bw, gpu)
        try:
            plot(args.out)
        except ImportError:
            print("matplotlib missing: run `python -m kvbench.bench --plot-only DIR` elsewhere")
    if args.e2e:
        res = run_e2e(args, gpu, bw)
        (args.out / "e2e.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
