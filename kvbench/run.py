"""One run as data flowing through the modules: config -> model, data -> method -> calibrate ->
patch -> evaluate -> record. :func:`run` is what ``python -m kvbench`` calls for each config."""

from __future__ import annotations

import json
import sys
import time

import torch
from omegaconf import OmegaConf

from kvbench.tracking import store as results


def build_method(cfg, info):
    """Instantiate the configured method plugin."""
    from kvbench.registry import get

    cls = get("method", cfg.method.name)
    method_cfg = OmegaConf.to_object(cfg.method) if OmegaConf.is_config(cfg.method) else cfg.method
    return cls(method_cfg, cfg.kv, info)


def validate(cfg):
    """Every check that needs no weights (:func:`kvbench.validate.check`), before anything loads;
    each failure is one line. Returns the :class:`~kvbench.validate.Checked` model shapes, method
    and data splits."""
    from kvbench.validate import check

    return check(cfg)


def pick_device(cfg) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(cfg, model, tok, splits, method) -> dict:
    """Run the configured evaluation (a registered ``eval`` plugin) on the patched model."""
    from kvbench.cache import patched
    from kvbench.registry import get

    evaluate_fn = get("eval", cfg.eval.name)
    with patched(model, method, cfg.kv.backend, cfg.kv.kernel, cfg.kv.prefill) as patch:
        metrics = evaluate_fn(cfg, model, tok, splits, method)
    if hasattr(patch.last_cache, "nbytes_per_token"):  # the packed cache measures its real tensors
        per_layer = patch.last_cache.nbytes_per_token()
        metrics["kv_memory"] = {"bytes_per_token": sum(per_layer), "bytes_per_token_per_layer": per_layer,
                                "allocated_bytes_per_token": sum(patch.last_cache.nbytes_per_token(used=False))}
        metrics["kv_bytes_per_token"] = sum(per_layer)
        metrics.update(decode_cost(cfg, method, patch.last_cache))
    return metrics


def decode_cost(cfg, method, cache) -> dict:
    """The packed format's name (``kv_format``) and the decode attention time per token at the last cache's
    context, measured on a GPU or looked up in the checked-in benchmark (``decode_us_source`` says which)."""
    from kvbench.kernels.records import decode_cost as cost, format_name

    kvs = [layer.packed_kv() for layer in cache.layers]
    out = {"kv_format": format_name(kvs[0])}
    with torch.no_grad():
        out.update(cost(kvs, method.info.num_heads, cfg.kv.bits, cache.get_seq_length(), str(cfg.kv.kernel.impl),
                        str(cfg.kv.kernel.path)))
    return out


def run(cfg) -> dict:
    """Run one experiment; returns its metrics (reused if an identical run already finished)."""
    if cfg.command == "calibrate":
        return calibrate_only(cfg)
    checked = validate(cfg)  # one line per bad input, before any weights load
    fingerprints = results.inputs(cfg)  # data and weights by content: the run's identity
    out = results.run_dir(cfg, fingerprints)
    with results.run_lock(out):  # identical runs started together: one computes, the others wait and reuse
        return compute(cfg, out, checked, fingerprints)


def compute(cfg, out, checked=None, fingerprints=None) -> dict:
    """The part of :func:`run` done under the run's lock: reuse the finished run in ``out``, or compute,
    save and log it."""
    from kvbench.data import load_splits
    from kvbench.model import load_model
    from kvbench.tracking.wandb import log_run

    checked = checked or validate(cfg)
    done = results.existing_metrics(out)
    if done is not None and cfg.rerun:
        print(f"kvbench: rerun=true: recomputing {out} (made at commit {results.run_commit(out)})", file=sys.stderr)
    elif done is not None:
        print(f"kvbench: identical run already finished at commit {results.run_commit(out)}, reusing {out} "
              f"(rerun=true recomputes it)", file=sys.stderr)
        log_run(cfg, done, out, reused=True)  # if its W&B run is incomplete, or under a W&B sweep agent
        summarize(cfg, done, out)
        return done
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, tok, info = load_model(cfg.model, pick_device(cfg))
    method = checked.method
    splits = checked.splits or load_splits(cfg.data)
    calibration = None
    if method.calibration_needs():
        from kvbench.calibration import prepare

        calibration = prepare(cfg, model, tok, splits, method)
    t1 = time.perf_counter()
    metrics = evaluate(cfg, model, tok, splits, method)
    t2 = time.perf_counter()
    ctx = cfg.eval.seqlen
    metrics["avg_bits"] = method.avg_bits(ctx)
    metrics["kv_saving"] = 1 - metrics["avg_bits"] / 16
    metrics["time"] = {"setup_s": t1 - t0, "eval_s": t2 - t1}
    param = next(model.parameters())  # model.dtype=auto / device=auto resolved on this machine
    metrics["model"] = {"layers": info.num_layers, "heads": info.num_heads, "kv_heads": info.num_kv_heads, "head_dim": info.head_dim,
                        "dtype": str(param.dtype).removeprefix("torch."), "device": param.device.type}
    results.atomic_write(out / "inputs.json", json.dumps(fingerprints or results.inputs(cfg), indent=2, sort_keys=True))
    results.save_run(out, cfg, metrics)
    log_run(cfg, metrics, out, calibration=calibration)
    summarize(cfg, metrics, out)
    return metrics


def calibrate_only(cfg) -> dict:
    """``python -m kvbench calibrate ...``: compute (or find) the method's calibration artifact."""
    from kvbench.calibration import prepare
    from kvbench.data import load_splits
    from kvbench.model import load_model

    checked = validate(cfg)
    method = checked.method
    if not method.calibration_needs():
        print(f"kvbench: method {cfg.method.name} needs no calibration")
        return {}
    model, tok, _ = load_model(cfg.model, pick_device(cfg))
    t0 = time.perf_counter()
    path = prepare(cfg, model, tok, checked.splits or load_splits(cfg.data), method)
    print(f"kvbench | calibration artifact for {cfg.method.name} on {cfg.model.name}: {path} ({time.perf_counter() - t0:.1f} s)")
    return {"artifact": str(path)}


def summarize(cfg, metrics: dict, out) -> None:
    what = cfg.method.name if metrics.get("avg_bits", 0) >= 16 else f"{cfg.method.name} {cfg.kv.bits}-bit"
    parts = [f"{what} on {cfg.model.name}/{cfg.data.name}"]
    if "ppl" in metrics:
        ci = metrics.get("ppl_ci95")
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}] 95 %" if ci else ""
        parts.append(f"ppl {metrics['ppl']:.3f}{interval} (token-level, ctx {metrics['ppl_info']['context']})")
    parts.append(f"avg bits {metrics['avg_bits']:.2f}")
    print("kvbench | " + " | ".join(parts) + f" | {out}")
