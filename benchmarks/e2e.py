"""End-to-end decode benchmark: ``generate`` tokens/s at a long context, fp16 caches vs the packed cache.

``python benchmarks/e2e.py [--shape llama3-8b --layers 8 --context 32768 --batch 8 --new 32 --bits 4 2]`` runs a
random-weight model of a real layer shape (Llama-2-7B: 32/32 heads; Llama-3-8B: 32/8 heads, GQA) with only
``--layers`` layers, so that the fp16 cache of the baseline fits on one GPU, with the fp16 DynamicCache /
StaticCache and the packed cache (decode path chosen by the tuning table; each packed run records the launch,
``launch``), and adds its record to
``benchmarks/results/e2e.json`` (one per GPU and shape). Needs torch, transformers and kvbench.kernels only.

After each run, ``--profile-steps`` bare forward steps on its cache are timed (``forward_ms_per_step``: the step
without ``generate``'s own loop) and profiled (``gpu_kernel_ms_per_step``: the GPU's busy time; the table in
``e2e_profile/`` beside ``--out``): a step far above its GPU time is bound by the host.

With ``--graphs`` (the default) the fp16 StaticCache and each packed cache also run a bare greedy loop twice,
eagerly and with every step that the cache allows replayed as a CUDA graph (:mod:`kvbench.cache.graphs`; the
packed cache runs a step that packs a key block eagerly, and captures again only once a store has grown and
moved): ``<name>-graphs`` records
both per-step times, the capture's, and whether every replayed step's logits equal the eager step's bit for
bit. That is the same treatment for both caches, without the host's per-step cost.

Each run also gets its memory roofline: a decode step reads every weight but the embedding table (the LM head
included) and the whole cache, so ``roofline_ms_per_step = (weight_bytes + kv_bytes) / copy bandwidth`` bounds
it from below, and ``roofline_speedup_vs_fp16`` is the most any cache format of that size can buy over the
fp16 cache on this model, batch and context.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from decode_attention import copy_bandwidth  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # layer shapes of the real models (vocabulary included: the LM head is read every step)
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500000.0),
}


class _StepTimer:
    """A generate() streamer that records a synchronized timestamp at every put (prompt, then tokens)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def step_profile(model, cache, B: int, pos: int, steps: int, out: Path, title: str) -> dict:
    """Bare forward decode steps on a generated cache (no ``generate`` loop): wall ms per step (host and GPU
    together) and the GPU's kernel ms per step (``torch.profiler``), whose table goes to ``out``. Positions
    start at ``pos``: inside the prompt, so a static cache overwrites slots it has (the others append)."""
    from kvbench.cache.graphs import decode_step

    ids = torch.zeros(B, 1, dtype=torch.long, device="cuda")

    def step(i):
        decode_step(model, cache, ids, torch.tensor([pos + i], device="cuda"))

    step(0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(steps + 1, 2 * steps + 1):
            step(i)
        torch.cuda.synchronize()
    table = prof.key_averages()
    # kernels only: an operator's self device time is its kernels' again
    gpu_us = sum(e.self_device_time_total for e in table if e.device_type != torch.autograd.DeviceType.CPU)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{title}, {steps} decode steps\n"
                   + table.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60) + "\n")
    return dict(forward_ms_per_step=round(1e3 * wall, 3), gpu_kernel_ms_per_step=round(gpu_us / 1e3 / steps, 3))


def loop_run(model, name: str, make_cache, prompt, N: int) -> dict:
    """Greedy decode of ``N`` tokens after ``prompt`` on fresh caches from ``make_cache``: eager forward steps,
    then :class:`~kvbench.cache.graphs.GraphedDecoder` steps. ``decode_ms_per_step`` is the mean over steps
    2..N-1 (step 0 of the graphed loop runs eagerly, step 1 captures; later packing steps and any re-capture
    count), with the 10/50/90 % quantiles of the graphed steps."""
    from kvbench.cache.graphs import GraphedDecoder, decode_step

    B, T = prompt.shape
    logits_of, ms = {}, {}
    for graphed in (False, True):
        torch.cuda.empty_cache()
        cache = make_cache()
        dec = GraphedDecoder(model, cache, B) if graphed else None
        steps, times = [], []
        with torch.no_grad():
            logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            for i in range(N):
                ids = logits.argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if dec is not None:
                    logits = dec(ids, T + i)
                else:
                    logits = decode_step(model, cache, ids, torch.tensor([T + i], device="cuda"))
                steps.append(logits.clone())
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        logits_of[graphed], ms[graphed] = torch.stack(steps), times
        stats = dec.stats if dec is not None else None
        del cache, dec
    mean = lambda t: round(1e3 * sum(t[2:]) / len(t[2:]), 3)  # noqa: E731
    q = torch.tensor(ms[True][2:]).quantile(torch.tensor([0.1, 0.5, 0.9])) * 1e3
    return dict(name=f"{name}-graphs", decode_ms_per_step=mean(ms[True]), decode_tok_s=round(B / mean(ms[True]) * 1e3, 1),
                step_ms_p10_p50_p90=[round(x, 3) for x in q.tolist()], eager_loop_ms_per_step=mean(ms[False]),
                capture_step_ms=round(1e3 * ms[True][1], 3), steps=stats,
                graphs_equal_eager=bool(torch.equal(logits_of[True], logits_of[False])))


def decode_launch(cache, n_heads: int, batch: int, path: str) -> dict:
    """The decode path and launch the tuning table gives ``cache``'s decode of ``n_heads`` query heads at
    ``batch`` (its first layer; every layer has its shape): what a packed run ran, for its record."""
    from kvbench.kernels import triton as tk

    kv = cache.layers[0].packed_kv()
    first = kv[0] if isinstance(kv, list) else kv  # a mixed-width cache: a list of stores
    q = torch.empty(batch, n_heads, first.k_scale.shape[-1], dtype=torch.float16, device=first.k_words.device)
    return {k: v for k, v in tk.choose(q, kv, path).items() if k != "gpu"}


def run_e2e(args, gpu: str) -> dict:
    """Decode tokens/s of ``generate`` at a long context on a random-weight model of ``args.shape``'s layer
    shape with only ``--layers`` layers (so that the fp16 cache of the baseline fits on one GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbench.cache import PACKED_ATTN, PackedCacheSpec, make_packed_cache, register_packed_attention

    register_packed_attention()
    B, T, N = args.e2e_batch, args.e2e_context, args.e2e_new
    cfg = LlamaConfig(**MODELS[args.shape], num_hidden_layers=args.e2e_layers, max_position_embeddings=T + N + 256)
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
    configs = [("fp16-dynamic", None, None), ("fp16-static", None, None)] + [
        (f"packed-{b}bit" + ("" if path == "auto" else f"-{path}"), b, path) for b in args.e2e_bits for path in args.paths]
    for name, bits, path in configs:
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
                                   key_block=args.key_block, recent_window=args.recent, path=path)
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
            name=name, bits=bits, path=path, prefill_s=round(t[1] - t[0], 3),
            decode_tok_s=round(B * (len(t) - 2) / (t[-1] - t[1]), 1),
            decode_ms_per_step=round(1e3 * (t[-1] - t[1]) / (len(t) - 2), 3),
            kv_bytes=kv_bytes, kv_bytes_per_token_per_layer=round(kv_bytes / (B * (T + N - 1)) / args.e2e_layers, 1),
            peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
        )
        if cache is not None:
            rec["launch"] = decode_launch(cache, cfg.num_attention_heads, B, path)
        if args.profile_steps and kw.get("cache_implementation") == "static":  # full after generate: no more steps
            rec["profile_error"] = "not profiled: the static cache is full after generate"
        elif args.profile_steps:
            try:
                with torch.no_grad():
                    table = args.out.parent / "e2e_profile" / f"{gpu.replace(' ', '-')}-{args.shape}-{name}.txt"
                    rec.update(step_profile(model, pkv, B, T - 2 * args.profile_steps - 2, args.profile_steps, table,
                                            f"{gpu}, {args.shape} x {args.e2e_layers} layers, batch {B}, context {T}: "
                                            f"{name}"))
            except Exception as e:  # noqa: BLE001 - the timed run stands; say why its decomposition is missing
                rec["profile_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        runs.append(rec)
        print("e2e", rec, flush=True)
        del out, pkv, cache
        if args.graphs and name != "fp16-dynamic":
            if bits is None:
                from transformers import StaticCache

                make = lambda: StaticCache(config=model.config, max_cache_len=T + N)  # noqa: E731
            else:
                make = lambda: make_packed_cache(model.config, spec)  # noqa: E731
            try:
                g = loop_run(model, name, make, prompt, N)
                g.update(bits=bits, path=path, kv_bytes=rec["kv_bytes"])
            except torch.OutOfMemoryError as e:
                g = dict(name=f"{name}-graphs", error=f"OOM: {str(e)[:120]}")
            runs.append(g)
            print("e2e", g, flush=True)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    bw = copy_bandwidth()
    for r in runs:
        if "error" not in r:
            r["roofline_ms_per_step"] = round(1e3 * (weight_bytes + r["kv_bytes"]) / bw, 3)
    base = next((r for r in runs if r["name"] == "fp16-dynamic" and "error" not in r), None)
    best = [r for r in runs if r["name"] in ("fp16-dynamic", "fp16-static") and "error" not in r]
    best = min(best, key=lambda r: r["decode_ms_per_step"]) if best else None
    static_g = next((r for r in runs if r["name"] == "fp16-static-graphs" and "error" not in r), None)
    for r in runs:
        if "error" in r or base is None:
            continue
        if r["name"].endswith("-graphs"):  # compared under the same treatment only
            if static_g is not None:
                r["speedup_vs_fp16_static_graphs"] = round(static_g["decode_ms_per_step"] / r["decode_ms_per_step"], 3)
            r["roofline_speedup_vs_fp16"] = round(base["roofline_ms_per_step"] / r["roofline_ms_per_step"], 3)
            continue
        r["speedup_vs_fp16_dynamic"] = round(base["decode_ms_per_step"] / r["decode_ms_per_step"], 3)
        r["speedup_vs_best_fp16"] = round(best["decode_ms_per_step"] / r["decode_ms_per_step"], 3)
        r["kv_mem_reduction_vs_fp16"] = round(base["kv_bytes"] / r["kv_bytes"], 3)
        r["roofline_speedup_vs_fp16"] = round(base["roofline_ms_per_step"] / r["roofline_ms_per_step"], 3)
    return dict(gpu=gpu, shape=args.shape, model=f"random-weight {args.shape} layer shape",
                layers=args.e2e_layers, batch=B, context=T, new_tokens=N, weight_bytes=weight_bytes,
                copy_GBps=round(bw / 1e9, 1), key_block=args.key_block,
                value_group=args.value_group, recent=args.recent, quantized_cache=qc_status, runs=runs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS / "e2e.json")
    p.add_argument("--shape", choices=list(MODELS), default="llama3-8b")
    p.add_argument("--layers", dest="e2e_layers", type=int, default=8)
    p.add_argument("--context", dest="e2e_context", type=int, default=32768)
    p.add_argument("--batch", dest="e2e_batch", type=int, default=8)
    p.add_argument("--new", dest="e2e_new", type=int, default=32)
    p.add_argument("--bits", dest="e2e_bits", nargs="+", type=int, default=[4, 2])
    p.add_argument("--paths", nargs="+", default=["auto"], help="decode paths of the packed runs (auto: the tuning "
                   "table's; a named one runs as packed-<bits>bit-<path>)")
    p.add_argument("--key-block", type=int, default=128)
    p.add_argument("--value-group", type=int, default=128)
    p.add_argument("--recent", type=int, default=128, help="fp16 recent-window tokens")
    p.add_argument("--profile-steps", type=int, default=4, help="bare forward steps timed and profiled after "
                   "each run (forward_ms_per_step, gpu_kernel_ms_per_step, tables in results/e2e_profile/); 0: none")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True, help="also the greedy loop, "
                   "eager and replayed as CUDA graphs, for fp16 StaticCache and each packed cache (<name>-graphs)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/e2e.py needs a CUDA GPU")
    from kvbench.kernels.triton import PATHS

    unknown = sorted(set(args.paths) - {"auto", *PATHS})
    if unknown:
        raise SystemExit(f"unknown decode paths {unknown}; known: auto, {', '.join(PATHS)}")
    res = run_e2e(args, torch.cuda.get_device_name())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    old = [old] if isinstance(old, dict) else old
    kept = [r for r in old if (r["gpu"], r.get("shape", "llama2-7b")) != (res["gpu"], res["shape"])]
    args.out.write_text(json.dumps(kept + [res], indent=1) + "\n")


if __name__ == "__main__":
    main()
