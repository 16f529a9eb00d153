"""Decode-attention benchmark: the packed kernels against fp16 SDPA on the current CUDA GPU.

``python benchmarks/decode_attention.py [--T 4096 16384 32768 65536 131072] [--batch 1 8] [--bits 2 3 4]``
measures, for Llama-2-7B (32/32 heads) and Llama-3-8B (32/8 heads) head shapes (head_dim 128):

* the device-to-device copy bandwidth (bytes read + written per second), the ceiling;
* decode attention of one query token over ``T`` cached tokens: the packed Triton kernel (the path and
  launch tuning the tuning table chooses, or ``--path``) against fp16 ``scaled_dot_product_attention``
  with torch's default backend and with the flash backend, and its relative error against the reference
  twin.

``--formats`` picks the packed formats (default ``uniform``): ``uniform`` (uniform codes, keys per channel in
key blocks, values per token), ``kvquant`` (NUQ codebooks, pre-RoPE keys, 1 % key and value outliers in CSR),
``qokv`` (per-token keys and values, channel shifts/scales, pre-RoPE keys, token groups of 10/60/30 % with
values at bits + 1 / bits / bits - 1, one store per width), and ``nuq``, ``pre-rope``, ``k-outliers``,
``v-outliers``: one of KVQuant's components on the uniform format, what it costs alone. Each record names its
``method`` and its ``format`` (:func:`kvbench.kernels.records.format_name`, what a run records as ``kv_format``).

Writes ``benchmarks/results/decode_attention.json`` (one record per GPU, shape, batch, T, bits, format; rows
not measured again are kept), ``decode_attention.md`` and a PNG plot where matplotlib is installed
(``--plot-only`` redraws it from the JSON on any machine). Imports only torch and kvbench.kernels.

Smoke test on a CPU (Triton interpreter, a tiny shape, CPU timings mean nothing):
``TRITON_INTERPRET=1 python benchmarks/decode_attention.py --smoke --out /tmp/bench --formats uniform kvquant qokv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from kvbench.kernels import ops, reference  # noqa: E402
from kvbench.kernels.records import PLAIN, format_name  # noqa: E402
from kvbench.kernels import triton as tk  # noqa: E402

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128), "tiny": (4, 2, 64)}  # (H_q, H_kv, D); tiny: --smoke
KVQUANT_PARTS = ("nuq", "pre-rope", "k-outliers", "v-outliers")  # each alone on the uniform format: what it costs
FORMATS = ("uniform", "kvquant", "qokv", *KVQUANT_PARTS)
QOKV_SHARES, QOKV_VALUE_OFFSETS = (0.1, 0.6, 0.3), (1, 0, -1)  # methods/qokv.py defaults (min_bits 2)
RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = "cuda"  # "cpu" only with --smoke


L2_FLUSHES = ("read", "write")


def bench_us(fn, graph: bool = True, flush: str = "read") -> float:
    """Median GPU time of ``fn`` in microseconds, the L2 flushed before each run (as ``triton.testing.do_bench``
    times: events around each run, 25 ms of warm-up, 100 ms of runs).

    ``flush``: ``"read"`` evicts the L2 by reading 256 MiB, which leaves it holding clean lines, as a decode
    step finds it (the GEMMs before attention read weights); ``"write"`` zeroes 256 MiB as ``do_bench`` does,
    which leaves the L2 full of dirty lines whose write-back the timed kernel pays for as it evicts them, more
    the more it reads: on the H200 that slowed fp16 SDPA by up to 9 us more than the packed kernels
    (``decode_attention_write_flush.json`` against ``decode_attention.json``), a bias in the packed kernels'
    favour.

    ``graph``: ``fn`` is captured once in a CUDA graph and the graph is replayed, so the time is the GPU's
    (a replay costs the host a few microseconds, less than the flush before it). Timing ``fn`` itself
    (``graph=False``) also counts its host work whenever that outlasts the flush: the Python dispatch and
    Triton launches of a packed decode (``kernel_call_us`` in the records), which made the GPU wait between
    the timing events and inflated the small cases of the earlier (eager) H200 records.
    """
    if flush not in L2_FLUSHES:
        raise ValueError(f"flush must be one of {L2_FLUSHES}, got {flush!r}")
    if not torch.cuda.is_available():  # --smoke on a CPU: wall time of a few calls (meaningless numbers)
        import time

        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return sorted(times)[1]
    if graph:
        fn()  # compiled, allocator warm, outside the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    big = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")
    evict = (lambda: torch.amax(big)) if flush == "read" else big.zero_
    evict()
    est = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    est[0].record()
    for _ in range(5):
        evict()
        fn()
    est[1].record()
    torch.cuda.synchronize()
    per_ms = est[0].elapsed_time(est[1]) / 5  # with the flush: a bound on the runs' count, as do_bench takes it
    for _ in range(max(1, int(25 / per_ms))):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(max(1, int(100 / per_ms)))]
    for start, end in events:
        evict()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2] * 1e3


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    x = torch.randn(n, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    us = bench_us(lambda: y.copy_(x), graph=False)  # captured, a copy becomes a slower copy-engine memcpy node
    return 2 * n * 2 / (us * 1e-6)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def packed_bytes_read(kv) -> int:
    """Bytes the decode kernel must read: valid codes, scales, zeros, fp16 tokens, codebooks, outliers, channel
    scales, token positions (q ignored); a mixed-width list: the sum over its stores."""
    if isinstance(kv, (list, tuple)):
        return sum(packed_bytes_read(part) for part in kv)
    n, nb = kv.n_packed, -(-kv.n_packed // kv.key_block)
    nk = n if kv.key_axis == "token" else nb
    sparse = [t for p in ("ol", "vol") if getattr(kv, f"{p}_ptr") is not None
              for t in (getattr(kv, f"{p}_ptr"), *(getattr(kv, f"{p}_{f}")[:, :, : int(getattr(kv, f"{p}_ptr")[:, :, -1].max())]
                                                  for f in ("tok", "ch", "val")))]
    return _nbytes(
        kv.k_words[:, :, :n], kv.v_words[:, :, :n], kv.k_scale[:, :, :nk], kv.k_zero[:, :, :nk],
        kv.v_scale[:, :, :n], kv.v_zero[:, :, :n], kv.sink_k[:, :, : kv.n_sink], kv.sink_v[:, :, : kv.n_sink],
        kv.recent_k[:, :, : kv.n_recent], kv.recent_v[:, :, : kv.n_recent], kv.k_lut, kv.v_lut, kv.k_chan, kv.v_chan,
        None if kv.positions is None else kv.positions[:, :n], *sparse,
    )


def build_format(fmt: str, k, v, bits: int, args):
    """The packed cache of ``k, v (B, H, T, D)`` in format ``fmt`` (see the module docstring), the last
    ``args.recent`` tokens in fp16, its counts on the GPU as the cache keeps them (else every decode would also
    time the two fills that make them). Codebooks, thresholds and channel scales are stand-ins with the right
    shapes and plausible values: the kernels' cost does not depend on them."""
    kv = _build_format(fmt, k, v, bits, args)
    for store in kv if isinstance(kv, list) else [kv]:
        store.packed_len, store.recent_len = (torch.full((1,), c, dtype=torch.int64, device=k.device)
                                              for c in (store.n_packed, store.n_recent))
    return kv


def plain_cache(k, v, bits: int):
    """The uniform packed cache of ``k, v`` at the benchmark's defaults (key blocks of 128, one value group per
    token, 128 recent fp16 tokens), counts on the GPU: what ``tune_decode.py`` and ``ncu_decode.py`` time."""
    return build_format("uniform", k, v, bits, argparse.Namespace(key_block=128, value_group=k.shape[-1], recent=128))


def _build_format(fmt: str, k, v, bits: int, args):
    B, H, T, D = k.shape
    if fmt == "uniform":
        return ops.build_packed_kv(k, v, bits, bits, args.key_block, args.value_group, n_sink=0, n_recent=args.recent,
                                   impl="triton")
    inv_freq = reference.default_inv_freq(D).to(k.device)
    if fmt == "kvquant" or fmt in KVQUANT_PARTS:  # all of KVQuant's components, or one
        # a normal-quantile codebook, thresholds at the 0.5 % / 99.5 % points of N(0, 1)
        cb = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.5, 2**bits - 0.5, 2**bits) / 2**bits)
        lut = ops.codebook_from_unit(cb / cb.abs().max(), bits).to(k.device).expand(H, D, 2**bits).contiguous()
        th = torch.full((H, D), 2.576, device=k.device)
        parts = {"nuq": dict(k_lut=lut, v_lut=lut), "pre-rope": dict(inv_freq=inv_freq),
                 "k-outliers": dict(k_clamp=(-th, th)), "v-outliers": dict(value_outlier_frac=0.01)}
        kw = {key: val for part in (KVQUANT_PARTS if fmt == "kvquant" else [fmt]) for key, val in parts[part].items()}
        return ops.build_packed_kv(k, v, bits, bits, args.key_block, args.value_group, n_sink=0, n_recent=args.recent,
                                   impl="triton", **kw)
    if fmt == "qokv":
        g = torch.Generator(device="cpu").manual_seed(0)
        chan = lambda shift: torch.stack([torch.rand(H, D, generator=g) + 0.5,  # noqa: E731
                                          torch.randn(H, D, generator=g) * shift]).to(k.device)
        n = T - args.recent
        rank = torch.rand(B, n, generator=g).argsort(1).argsort(1).float() / n  # a random order of the tokens
        groups = torch.bucketize(rank, torch.tensor(QOKV_SHARES).cumsum(0)[:-1] - 1e-9, right=True).to(k.device)
        group_bits = [(bits, min(8, max(2, bits + o))) for o in QOKV_VALUE_OFFSETS]
        return ops.build_mixed_kv(k, v, groups, group_bits, n_sink=0, n_recent=args.recent, key_block=args.key_block,
                                  key_group=D, value_group=D, k_chan=chan(1.0), v_chan=chan(0.0), inv_freq=inv_freq,
                                  impl="triton")
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


REL_BAR = 2e-3  # the largest relative error a timed kernel may have against its reference twin


def rel_err_vs_reference(q, kv, out) -> float:
    """Relative L2 error of ``out`` against the reference twin, one batch row at a time (memory)."""
    num = den = 0.0
    shared = ("k_lut", "v_lut", "inv_freq", "k_chan", "v_chan", "recent_len", "packed_len")  # no batch axis

    def row_of(part, b):
        return dataclasses.replace(part, **{f.name: getattr(part, f.name)[b : b + 1] for f in dataclasses.fields(part)
                                            if isinstance(getattr(part, f.name), torch.Tensor) and f.name not in shared})

    for b in range(q.shape[0]):
        row = [row_of(p, b) for p in kv] if isinstance(kv, (list, tuple)) else row_of(kv, b)
        ref = ops.decode_attention(q[b : b + 1], row, impl="reference").float()
        num += (out[b : b + 1].float() - ref).norm().item() ** 2
        den += ref.norm().item() ** 2
    return (num / den) ** 0.5


def run(args, copy_bw: float, gpu: str, records: list[dict]) -> list[dict]:
    """Measure every case into ``records`` (appended as measured: a run cut short keeps what it measured)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        for batch in args.batch:
            for T in args.T:
                torch.manual_seed(0)
                try:
                    k = torch.randn(batch, hkv, T, d, dtype=torch.float16, device=DEVICE)
                    v = torch.randn_like(k)
                except torch.OutOfMemoryError:
                    print(f"skip {shape} B={batch} T={T}: out of memory")
                    continue
                q = torch.randn(batch, hq, d, dtype=torch.float16, device=DEVICE)
                q4 = q[:, :, None]  # (B, H_q, 1, D)
                gqa = hq != hkv
                fp16_us = bench_us(lambda: sdpa(q4, k, v, enable_gqa=gqa), flush=args.l2_flush)
                try:
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        flash_us = bench_us(lambda: sdpa(q4, k, v, enable_gqa=gqa), flush=args.l2_flush)
                except RuntimeError as e:  # flash may refuse a shape
                    flash_us, _ = None, print(f"flash backend failed: {e}")
                best = min(x for x in (fp16_us, flash_us) if x is not None)
                fp16_bytes = _nbytes(k, v)
                for bits, fmt in [(b, f) for b in args.bits for f in args.formats]:
                    try:  # building a format (outlier splits, the reference twin) takes several times the fp16 K/V
                        kv = build_format(fmt, k, v, bits, args)
                        launch = tk.choose(q, kv, args.path)  # what decode_attention below runs
                        fn = lambda: tk.decode_attention(q, kv, path=args.path)  # noqa: E731
                        rel = rel_err_vs_reference(q, kv, fn())
                    except torch.OutOfMemoryError:
                        print(f"skip {shape} B={batch} T={T} {bits}b {fmt}: out of memory", flush=True)
                        kv = fn = None
                        torch.cuda.empty_cache()
                        continue
                    us = bench_us(fn, flush=args.l2_flush)
                    call_us = bench_us(fn, graph=False, flush=args.l2_flush)
                    nbytes = packed_bytes_read(kv)
                    rec = dict(
                        gpu=gpu, shape=shape, h_q=hq, h_kv=hkv, head_dim=d, bits=bits, T=T, batch=batch,
                        method=fmt, format=format_name(kv),
                        path=launch["path"], kernel_us=round(us, 2), kernel_call_us=round(call_us, 2), timing="cuda graph" if DEVICE == "cuda" else "wall",
                        l2_flush=args.l2_flush,
                        fp16_us=round(fp16_us, 2),
                        fp16_flash_us=None if flash_us is None else round(flash_us, 2),
                        speedup=round(fp16_us / us, 3), speedup_vs_best_fp16=round(best / us, 3),
                        bandwidth_frac=round(nbytes / (us * 1e-6) / copy_bw, 3),
                        fp16_bandwidth_frac=round(fp16_bytes / (fp16_us * 1e-6) / copy_bw, 3),
                        rel_err_vs_reference=float(f"{rel:.3g}"), packed_bytes=nbytes, fp16_bytes=fp16_bytes,
                        copy_GBps=round(copy_bw / 1e9, 1), key_block=args.key_block, value_group=args.value_group,
                        recent=args.recent,
                        tuning={k: v for k, v in launch.items() if k not in ("path", "gpu")},
                        torch=torch.__version__, triton=__import__("triton").__version__,
                    )
                    records.append(rec)
                    print(f"{shape:9s} {fmt:8s} B={batch} T={T:6d} {bits}b {rec['path']:11s} {us:8.1f}us fp16 {fp16_us:8.1f}us "
                          f"flash {flash_us or float('nan'):8.1f}us x{rec['speedup']:.2f} (best x"
                          f"{rec['speedup_vs_best_fp16']:.2f}) bw {rec['bandwidth_frac']:.2f} rel {rel:.1e}", flush=True)
                    del kv, fn  # fn holds the cache too: the next format would be built beside it
                del k, v
                torch.cuda.empty_cache()
    return records


def check_paths(out_dir: Path, gpu: str) -> list[dict]:
    """Every decode path, forced, against the reference twin wherever it applies: 2/3/4 bits, G = 1/4/8, sink
    and recent fp16 tokens, a partial last key block and tile, head_dim 128. Writes ``decode_paths_check.json``."""
    rows = []
    for bits in (2, 3, 4):
        for G in (1, 4, 8):
            torch.manual_seed(bits * 10 + G)
            B, H, D, sink, recent, n_packed = 2, 4, 128, 4, 37, 3 * 128 + 77
            T = sink + 4 * 128 + recent
            k = torch.randn(B, H, T, D, dtype=torch.float16, device="cuda") * 2
            v = torch.randn_like(k)
            q = torch.randn(B, H * G, D, dtype=torch.float16, device="cuda") * 2
            full = ops.build_packed_kv(k, v, bits, bits, 128, D, sink, recent, impl="triton")
            kv = dataclasses.replace(full, n_packed=n_packed)  # calibrated scales pack token by token
            ref = ops.decode_attention(q, kv, impl="reference").float()
            for path, mod in tk.PATHS.items():
                if not mod.applies(kv, G):
                    continue
                for n_splits in (None, 3):
                    out = tk.decode_attention(q, kv, path=path, n_splits=n_splits).float()
                    rel = ((out - ref).norm() / ref.norm()).item()
                    rows.append(dict(gpu=gpu, path=path, bits=bits, G=G, n_splits=n_splits,
                                     rel_err_vs_reference=float(f"{rel:.3g}"), finite=bool(torch.isfinite(out).all())))
                    print("check", rows[-1], flush=True)
    (out_dir / "decode_paths_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def write_markdown(records: list[dict], path: Path) -> None:
    lines = [
        "# Decode attention, packed kernel vs fp16 SDPA",
        "",
        "Generated by `python benchmarks/decode_attention.py` from `decode_attention.json`. `speedup` = fp16 SDPA "
        "(default backend) time / kernel time; `vs best` uses the faster of SDPA default and flash; `bw frac` = "
        "packed bytes read per second / copy bandwidth. `timing`: `cuda graph` = GPU time of a replayed graph (both "
        "sides), with `call us` the packed decode called from Python (host work included); `eager` = older rows, "
        "timed as called. `flush`: how the L2 was emptied before each run (`read`: 256 MiB read; `write`: 256 MiB "
        "zeroed, as `triton.testing.do_bench` does, in rows without the field; see `bench_us`).",
        "",
        "| gpu | shape | B | T | bits | method | path | timing | flush | kernel us | call us | fp16 us | flash us | speedup | vs best | bw frac | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['gpu']} | {r['shape']} | {r['batch']} | {r['T']} | {r['bits']} | {r.get('method', 'uniform')} | "
                     f"{r['path']} | {r.get('timing', 'eager')} | {r.get('l2_flush', 'write')} | "
                     f"{r['kernel_us']} | {r.get('kernel_call_us', '–')} | {r['fp16_us']} | {r['fp16_flash_us']} | {r['speedup']} | "
                     f"{r['speedup_vs_best_fp16']} | {r['bandwidth_frac']} | {r['rel_err_vs_reference']} |")
    path.write_text("\n".join(lines) + "\n")


def plot(out_dir: Path) -> None:
    """``decode_attention.png``: speedup vs T per GPU, shape and batch, one line per bit width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = json.loads((out_dir / "decode_attention.json").read_text())
    keys = sorted({(r["gpu"], r["shape"], r["batch"]) for r in recs})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, (gpu, shape, b) in zip(axes[0], keys):
        for bits, method in sorted({(r["bits"], r.get("method", "uniform")) for r in recs}):
            rs = sorted((r for r in recs if (r["gpu"], r["shape"], r["batch"], r["bits"], r.get("method", "uniform"))
                         == (gpu, shape, b, bits, method)), key=lambda r: r["T"])
            ax.plot([r["T"] for r in rs], [r["speedup_vs_best_fp16"] for r in rs], marker="o",
                    label=f"{bits}-bit" if method == "uniform" else f"{method} {bits}-bit")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{gpu}\n{shape}, batch {b}", fontsize=9)
        ax.set_xlabel("context T")
        ax.set_ylabel("speedup vs best fp16")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "decode_attention.png", dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b"], choices=list(SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=[4096, 16384, 32768, 65536, 131072])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--path", default="auto", help=f"auto or one of {', '.join(tk.PATHS)}")
    p.add_argument("--key-block", type=int, default=128)
    p.add_argument("--value-group", type=int, default=128)
    p.add_argument("--recent", type=int, default=128, help="fp16 recent-window tokens (part of T)")
    p.add_argument("--l2-flush", default="read", choices=L2_FLUSHES, help="how the L2 is emptied before each "
                   "timed run (see bench_us)")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--check", action="store_true", help="first check every path against the reference twin")
    p.add_argument("--formats", nargs="+", default=["uniform"], choices=FORMATS,
                   help="packed formats: uniform (the default), kvquant, qokv, or one KVQuant component (see the module "
                   "docstring)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny shape on a CPU under TRITON_INTERPRET=1 (checks the code path; times are meaningless)")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(args.out)
        return
    global DEVICE
    if args.smoke:
        args.shapes, args.T, args.batch, args.key_block, args.value_group, args.recent = ["tiny"], [160], [1], 32, 64, 32
        DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode_attention.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    bw = copy_bandwidth() if DEVICE == "cuda" else float("nan")
    print(f"{gpu}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    if args.check:
        bad = [r for r in check_paths(args.out, gpu) if not r["finite"] or r["rel_err_vs_reference"] > REL_BAR]
        if bad:
            raise SystemExit(f"paths off their reference twin: {bad}")
    path = args.out / "decode_attention.json"
    new = []
    try:
        run(args, bw, gpu, new)
    finally:  # a kernel off its reference twin replaces no record: its time is not a number to keep
        good = [r for r in new if r["rel_err_vs_reference"] <= REL_BAR]
        key = lambda r: (r["gpu"], r["shape"], r["batch"], r["T"], r["bits"], r.get("format", PLAIN))  # noqa: E731
        measured = {key(r) for r in good}
        kept = [r for r in json.loads(path.read_text()) if key(r) not in measured] if path.exists() else []
        rows = kept + good
        path.write_text(json.dumps(rows, indent=1) + "\n")
        write_markdown(rows, args.out / "decode_attention.md")
    off = [(r["shape"], r["batch"], r["T"], r["bits"], r["rel_err_vs_reference"]) for r in new
           if not r["rel_err_vs_reference"] <= REL_BAR]
    if off:
        raise SystemExit(f"timed kernels off their reference twin by more than {REL_BAR}, not recorded: {off}")
    try:
        plot(args.out)
    except ImportError:
        print("matplotlib missing: run `python benchmarks/decode_attention.py --plot-only` elsewhere")


if __name__ == "__main__":
    main()
