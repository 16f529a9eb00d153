"""kvbench's whole pipeline on a GPU at 8B scale: simulated perplexity, calibration, passkey (issue 17).

Runs kvbench itself (``compose`` + the pieces of ``kvbench.run``: validate, load, calibrate, evaluate)
on a random-weight model of a real architecture (``model.random_init=true``: timing and memory are the
real model's, accuracy is not measured) and a synthetic corpus (no download), and writes one record per
(gpu, shape, method, bits, context, what) to ``benchmarks/results/gpu_pipeline.json`` (+ ``.md``):

- ``ppl``: simulated perplexity at 2048 and 32768 tokens for fp16, uniform, kvquant, qokv at 4 bits:
  ``tokens_per_s``, ``fp16_tokens_per_s``, ``overhead`` (time / fp16 time on the same windows),
  ``peak_mem_gb`` (``torch.cuda.max_memory_allocated`` during the evaluation, weights included);
- ``calibration``: KVQuant (and QoKV) calibration with Fisher on 16 x 2048 tokens: ``calib_s``,
  ``calib_peak_mem_gb``;
- ``passkey``: ``eval=passkey`` at 32k through ``generate()`` and the quantizing cache;
- ``harness``: ``eval=harness`` (lm-eval, offline PIQA and ARC-Easy, ``--harness-limit`` documents each)
  on the patched model: ``eval_s``, ``peak_mem_gb`` and lm-eval's accuracies (chance level: random weights);
- ``profile``: one 2048-token window per method under ``torch.profiler``; the top CUDA kernels and the
  host time go to ``--profile-dir`` (``profile_<method>.txt``), what bounds the overhead;
- ``agreement``: a scaled-down random-weight model in fp32, perplexity on this machine's CPU and GPU
  (tests/test_random_init.py pins the CPU value).

    python benchmarks/gpu_pipeline.py                       # on a GPU: the records above but profile (~7 min, H200)
    python benchmarks/gpu_pipeline.py --small --device cpu  # the same pipeline on tiny shapes (a CPU check)
    python benchmarks/gpu_pipeline.py --render              # only re-render the .md from the .json
    python benchmarks/gpu_pipeline.py --append --parts harness,profile --profile-dir /tmp/prof
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_pipeline.json"
METHODS = ("fp16", "uniform", "kvquant", "qokv")
PARTS = {"agreement", "calib", "ppl", "long", "passkey", "harness", "profile"}
SHAPE = "llama-3-8b"
# a scaled-down Llama-3-8B (same family, 2 layers): the CPU/GPU agreement model, and --small
SMALL = ("model.architecture.num_hidden_layers=2", "model.architecture.hidden_size=128",
         "model.architecture.intermediate_size=256", "model.architecture.num_attention_heads=4",
         "model.architecture.num_key_value_heads=2", "model.architecture.head_dim=32",
         "model.architecture.vocab_size=512")
AGREEMENT = (f"model={SHAPE}", "model.random_init=true", "model.dtype=float32", *SMALL,
             "method=fp16", "eval.seqlen=512", "eval.max_windows=4")
WORDS = ("the of and to in is was for on as with by that at from his it an were are which this be "
         "cache key value token layer head bit quantization attention model memory group channel scale "
         "perplexity context window sink outlier codebook rotation budget kernel calibration Fisher").split()


def synthetic_corpus(n_words: int = 150_000, seed: int = 0) -> str:
    """Deterministic filler text (sentences of common words, paragraphs), the same on every machine."""
    rng = random.Random(seed)
    paras, words = [], 0
    while words < n_words:
        sents = []
        for _ in range(rng.randint(3, 8)):
            n = rng.randint(6, 18)
            sents.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
            words += n
        paras.append(" ".join(sents))
    return "\n\n".join(paras) + "\n"


def write_corpus(folder: Path) -> Path:
    path = folder / "corpus.txt"
    path.write_text(synthetic_corpus())
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Pipeline:
    """One loaded model; each step composes a run config and goes through kvbench's own pieces."""

    def __init__(self, base: list[str], device: str):
        from kvbench.config import compose
        from kvbench.model import load_model

        self.base, self.device, self.compose = base, device, compose
        cfg = compose([*base, "method=fp16"])
        t0 = time.perf_counter()
        self.model, self.tok, self.info = load_model(cfg.model, device)
        sync(device)
        self.load_s = time.perf_counter() - t0
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def checked(self, overrides: list[str]):
        from kvbench.run import validate

        cfg = self.compose([*self.base, *overrides])
        return cfg, validate(cfg)

    def calibrate(self, overrides: list[str]) -> dict:
        """Calibrate (statistics with Fisher + the method's fit, artifact written); time and peak memory."""
        from kvbench.calibration import prepare
        from kvbench.calibration.stats import _STATS_CACHE

        cfg, checked = self.checked(overrides)
        _STATS_CACHE.clear()  # time the whole calibration, not a cached statistic
        reset_peak(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        prepare(cfg, self.model, self.tok, checked.splits, checked.method)
        sync(self.device)
        return {"calib_s": time.perf_counter() - t0, "calib_peak_mem_gb": peak_gb(self.device),
                "calib_samples": cfg.calib.num_samples, "calib_seqlen": cfg.calib.seqlen, "fisher": cfg.calib.fisher}

    def evaluate(self, overrides: list[str]) -> tuple[dict, float, float | None]:
        """Calibrate if needed (artifact reused), then the configured evaluation, timed; (metrics, s, peak GB)."""
        from kvbench.calibration import prepare
        from kvbench.run import evaluate

        cfg, checked = self.checked(overrides)
        method = checked.method
        if method.calibration_needs():
            prepare(cfg, self.model, self.tok, checked.splits, method)
        reset_peak(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = evaluate(cfg, self.model, self.tok, checked.splits, method)
        sync(self.device)
        return metrics, time.perf_counter() - t0, peak_gb(self.device)


def gpu_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()})"


def agreement_ppl(device: str, corpus: Path, out: Path) -> float:
    """Perplexity of the scaled-down random-weight model (fp32) on ``device`` (tests pin the CPU value)."""
    p = Pipeline([*AGREEMENT, "data=text", f"data.path={corpus}", f"output_dir={out}", "logging.progress=false",
                  "logging.wandb.mode=disabled"], device)
    metrics, _, _ = p.evaluate([])
    return metrics["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes and contexts (a CPU check of the script)")
    ap.add_argument("--parts", default="agreement,calib,ppl,long,passkey,harness", help="add profile for the profiler tables")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--batches", default="1,8", help="windows per forward (eval.batch_size) of the short perplexity")
    ap.add_argument("--repeats", type=int, default=1, help="time each evaluation this often (median kept)")
    ap.add_argument("--kvquant-calib", default=None, help="e.g. 16x512 (default 16x2048, the issue's budget)")
    ap.add_argument("--append", action="store_true", help="keep the records already in --out")
    ap.add_argument("--harness-limit", type=int, default=100, help="documents per task of the harness part")
    ap.add_argument("--profile-dir", default=None, help="where the profile part writes its tables")
    ap.add_argument("--render", action="store_true", help="only write the .md from the .json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        render(out)
        return
    parts = set(args.parts.split(","))
    if parts - PARTS:
        ap.error(f"unknown --parts {sorted(parts - PARTS)}; known: {','.join(sorted(PARTS))}")
    work = Path(tempfile.mkdtemp(prefix="kvbench_gpu_"))
    corpus = write_corpus(work)
    dev = args.device
    short, long_ctx, calib = (256, 1024, ("calib.num_samples=4", "calib.seqlen=256")) if args.small else \
        (2048, 32768, ("calib.num_samples=16", "calib.seqlen=2048"))
    # KVQuant: Fisher on 16 x 2048 tokens (the budget); QoKV: the calib defaults (16 x 512, Fisher)
    if args.kvquant_calib:
        n, t = args.kvquant_calib.split("x")
        calib = (f"calib.num_samples={n}", f"calib.seqlen={t}")
    mcal = {"kvquant": calib, "qokv": ("calib.num_samples=2", "calib.seqlen=128") if args.small else ()}
    calib_of = lambda m: " x ".join(o.split("=")[1] for o in mcal[m]) or "16 x 512" if m in mcal else None  # noqa: E731
    base = [f"model={SHAPE}", "model.random_init=true", f"model.max_context={long_ctx}", *(SMALL if args.small else ()),
            "data=text", f"data.path={corpus}", "data.calib_fraction=0.2", "kv.bits=4", f"eval.seqlen={short}",
            f"output_dir={work / 'runs'}", f"calib.cache_dir={work / 'calib'}", "logging.progress=false",
            "logging.wandb.mode=disabled"]
    common = {"gpu": gpu_name(dev), "shape": SHAPE + (" (scaled down)" if args.small else ""), "torch": torch.__version__}
    records: list[dict] = json.loads(out.read_text())["records"] if args.append and out.exists() else []
    run = 1 + max((r.get("run", 1) for r in records), default=0)
    common["run"] = run

    def emit(rec: dict) -> None:
        rec = {**common, **rec}
        records.append(rec)
        print(json.dumps(rec), flush=True)
        save(out, records, common)  # after every record: a run cut short keeps what it measured

    if "agreement" in parts:
        cpu = agreement_ppl("cpu", corpus, work / "agree")
        gpu = agreement_ppl(dev, corpus, work / "agree") if dev != "cpu" else cpu
        emit({"what": "agreement", "method": "fp16", "bits": 16, "context": 512, "dtype": "float32",
              "shape": SHAPE + " (2 layers, hidden 128)", "cpu_ppl": cpu, "gpu_ppl": gpu, "rel_diff": abs(gpu / cpu - 1)})
    p = Pipeline(base, dev)
    common["dtype"] = p.dtype
    print(f"model built in {p.load_s:.1f} s ({p.dtype}, {p.info.num_layers} layers)", flush=True)
    if "calib" in parts:  # the calibrations the evaluations below use, timed
        for m in ("kvquant", "qokv"):
            c = p.calibrate([f"method={m}", *mcal[m]])
            emit({"what": "calibration", "method": m, "bits": 4, "context": c["calib_seqlen"], **c})
    p.evaluate(["method=fp16", f"eval.seqlen={short}", "eval.max_windows=1"])  # warm-up (kernels, allocator)
    plan = [(short, 8, b, "ppl") for b in map(int, args.batches.split(","))] + [(long_ctx, 1, 1, "long")]
    warm = set()
    for ctx, windows, batch, part in plan:
        if part not in parts:
            continue
        fp16_s = None
        for m in METHODS:
            try:
                if (m, short) not in warm:  # compile the method's kernels (first call), calibrate: not timed
                    p.evaluate([f"method={m}", *mcal.get(m, ()), f"eval.seqlen={short}", "eval.max_windows=1"])
                    warm.add((m, short))
                times = []
                for _ in range(args.repeats):
                    met, secs, peak = p.evaluate([f"method={m}", *mcal.get(m, ()), f"eval.seqlen={ctx}",
                                                  f"eval.max_windows={windows}", f"eval.batch_size={batch}"])
                    times.append(secs)
                secs = sorted(times)[len(times) // 2]  # the (upper) median
            except torch.OutOfMemoryError as e:
                emit({"what": "ppl", "method": m, "bits": 16 if m == "fp16" else 4, "context": ctx, "batch": batch,
                      "error": f"OOM: {str(e)[:160]}"})
                continue
            tokens = met["ppl_info"]["windows"] * ctx
            fp16_s = secs if m == "fp16" else fp16_s
            emit({"what": "ppl", "method": m, "bits": 16 if m == "fp16" else 4, "context": ctx, "windows": windows,
                  "batch": batch, "calib": calib_of(m), "eval_s_all": times,
                  "tokens": tokens, "eval_s": secs, "tokens_per_s": tokens / secs,
                  "fp16_tokens_per_s": tokens / fp16_s if fp16_s else None,
                  "overhead": secs / fp16_s if fp16_s else None, "peak_mem_gb": peak,
                  "ppl": met["ppl"], "avg_bits": checked_bits(p, m, ctx)})
    if "passkey" in parts:
        for m in METHODS:
            try:
                met, secs, peak = p.evaluate([f"method={m}", *mcal.get(m, ()), "eval=passkey", f"eval.passkey_lengths=[{long_ctx}]",
                                              "eval.passkey_depths=[0.5]", "eval.passkey_trials=1"])
                emit({"what": "passkey", "method": m, "bits": 16 if m == "fp16" else 4, "context": long_ctx,
                      "eval_s": secs, "peak_mem_gb": peak, "passkey_acc": met["passkey_acc"]})
            except torch.OutOfMemoryError as e:
                emit({"what": "passkey", "method": m, "bits": 16 if m == "fp16" else 4, "context": long_ctx, "error": f"OOM: {str(e)[:160]}"})
    if "harness" in parts:
        for m in METHODS:
            met, secs, peak = p.evaluate([f"method={m}", *mcal.get(m, ()), "eval=harness", "eval.tasks=[piqa,arc_easy]",
                                          f"eval.limit={args.harness_limit}", "eval.batch_size=1"])
            emit({"what": "harness", "method": m, "bits": 16 if m == "fp16" else 4, "eval_s": secs, "peak_mem_gb": peak,
                  "limit": args.harness_limit, **{f"{t}_acc": r["acc"] for t, r in met["tasks"].items()}})
    if "profile" in parts:
        profile(p, mcal, short, Path(args.profile_dir or tempfile.mkdtemp(prefix="kvbench_prof_")))
    print(f"wrote {out}")


def profile(p: Pipeline, mcal: dict, ctx: int, folder: Path) -> None:
    """One ``ctx``-token window of every method under ``torch.profiler``: kernels by CUDA time, host time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    folder.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if p.device.startswith("cuda") else [])
    for m in METHODS:
        run = [f"method={m}", *mcal.get(m, ()), f"eval.seqlen={ctx}", "eval.max_windows=1"]
        p.evaluate(run)  # warm: calibration artifact, kernels compiled
        with torch_profile(activities=acts) as prof:
            _, secs, _ = p.evaluate(run)
        key = "cuda_time_total" if p.device.startswith("cuda") else "cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
        (folder / f"profile_{m}.txt").write_text(f"{m}: one {ctx}-token window, {secs:.3f} s under the profiler\n{table}\n")
        print(f"profile {m}: {secs:.3f} s -> {folder / f'profile_{m}.txt'}", flush=True)


def checked_bits(p: Pipeline, method: str, ctx: int) -> float:
    _, checked = p.checked([f"method={method}"])
    return checked.method.avg_bits(ctx)


def save(out: Path, records: list[dict], common: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    doc = {"generated_by": old.get("generated_by", "python benchmarks/gpu_pipeline.py"), "gpu": common["gpu"], "records": records,
           "note": "random weights of the real architecture (model.random_init=true): time and memory are the "
                   "model's, perplexities are not accuracy; byte-level tokenizer, synthetic corpus"}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    render(out)


def render(path: Path) -> None:
    """The compact Markdown table of a results file (README.md includes it; the JSON has every field).

    One row per quantizing method; fp16's numbers in parentheses; ``ablation run``: calibration plus
    the 8 x 2048-token perplexity, what each configuration of an ablation costs (model load aside).
    """
    doc = json.loads(path.read_text())
    by = {(r["what"], r["method"], r.get("context"), r.get("batch", 1)): r for r in doc["records"] if "error" not in r}
    ppl = {(m, c): r for (w, m, c, b), r in by.items() if w == "ppl" and b == 1}
    spread = {}  # (method, context) -> the batch-1 overhead of each repeat of the newest run (fp16's repeat alike)
    newest = {(m, c): r.get("run", 1) for (w, m, c, b), r in by.items() if w == "ppl"}
    fp16_all = {(r.get("run", 1), r["context"]): r["eval_s_all"] for r in doc["records"]
                if r["what"] == "ppl" and r["method"] == "fp16" and r.get("batch", 1) == 1 and "eval_s_all" in r}
    for r in doc["records"]:
        key, run = (r["method"], r.get("context")), r.get("run", 1)
        if r["what"] == "ppl" and r.get("batch", 1) == 1 and r.get("overhead") is not None and run == newest.get(key):
            ref = fp16_all.get((run, r["context"]))
            pairs = zip(r["eval_s_all"], ref) if ref and len(ref) == len(r.get("eval_s_all", ())) else ()
            spread[key] = [a / b for a, b in pairs] or [r["overhead"]]
    span = lambda m, c: "–" if (m, c) not in spread else "–".join(sorted({f"{min(spread[m, c]):.2f}", f"{max(spread[m, c]):.2f}"}))  # noqa: E731
    ppl8 = {(m, c): r for (w, m, c, b), r in by.items() if w == "ppl" and b > 1}
    calib = {m: r for (w, m, _, _), r in by.items() if w == "calibration"}
    passkey = {m: r for (w, m, _, _), r in by.items() if w == "passkey"}
    harness = {m: r for (w, m, _, _), r in by.items() if w == "harness"}
    if not ppl:
        return
    short, long_ctx = min(c for _, c in ppl), max(c for _, c in ppl)
    batch = max((r.get("batch", 1) for r in ppl8.values()), default="–")
    g = lambda d, k, f: "–" if d is None or d.get(k) is None else f.format(d[k])  # noqa: E731
    fp = lambda ctx: ppl.get(("fp16", ctx))  # noqa: E731
    dtype = next((r["dtype"] for r in doc["records"] if r["what"] == "ppl"), "")
    limit = next((r["limit"] for r in harness.values()), "–")
    lines = [f"| 4 bits, {doc['gpu']}, {dtype} | tokens/s at {short} (fp16) | overhead {short} (repeats) / {short}, {batch} windows a forward / {long_ctx} | "
             f"peak GB at {long_ctx} (fp16) | passkey {long_ctx}: s (fp16) | harness, PIQA + ARC-Easy x {limit}: s (fp16) | "
             "calibration: tokens, s, peak GB | ablation run: s |", "|---|---|---|---|---|---|---|---|"]
    for m in METHODS[1:]:
        a, b, c, k = ppl.get((m, short)), ppl.get((m, long_ctx)), calib.get(m), passkey.get(m)
        cal = "–" if c is None else f"{c['calib_samples']} x {c['calib_seqlen']}, {c['calib_s']:.0f}, {c['calib_peak_mem_gb'] or 0:.1f}"
        run = (c["calib_s"] if c else 0) + (a["eval_s"] if a else 0)
        lines.append(f"| {m} | {g(a, 'tokens_per_s', '{:.0f}')} ({g(fp(short), 'tokens_per_s', '{:.0f}')}) | "
                     f"{span(m, short)} / {g(ppl8.get((m, short)), 'overhead', '{:.2f}')} / {span(m, long_ctx)} | {g(b, 'peak_mem_gb', '{:.1f}')} "
                     f"({g(fp(long_ctx), 'peak_mem_gb', '{:.1f}')}) | {g(k, 'eval_s', '{:.1f}')} ({g(passkey.get('fp16'), 'eval_s', '{:.1f}')}) | "
                     f"{g(harness.get(m), 'eval_s', '{:.1f}')} ({g(harness.get('fp16'), 'eval_s', '{:.1f}')}) | {cal} | {run:.0f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
