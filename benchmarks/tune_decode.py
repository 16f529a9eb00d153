"""Launch tuning of a decode path on this GPU: time a grid of launch parameters per shape, batch, context and
bit width, and print the best per case.

``python benchmarks/tune_decode.py --path tensor_core --shapes llama3-8b [--write-rules]`` writes
``benchmarks/results/tune_decode.json`` (every timing, named by its GPU); with ``--write-rules`` it also puts
this GPU's rules for the tuned path into ``kvbench/kernels/tuning.json``: per bit width, the launch
parameters with the least total time over the cases, each case's time taken relative to its best; batch 1 gets
its own rule where its best launch differs from the larger batches' (``split_k`` rules, tuned on ``--format
kvquant``, go after the others: that path reads every format).
The default grid is the region every H200 rule came from (one warp, tokens as the dots' M, 8 or 12 waves).
Needs torch and kvbench.kernels.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from decode_attention import REL_BAR, SHAPES, bench_us, build_format, rel_err_vs_reference  # noqa: E402

from kvbench.kernels import tuning  # noqa: E402
from kvbench.kernels import triton as tk  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS / "tune_decode.json")
    p.add_argument("--path", default="tensor_core", choices=list(tk.PATHS))
    p.add_argument("--format", default="uniform", choices=TUNED_FORMATS, help="the packed format timed (kvquant: "
                   "decode_attention.py's, for split_k)")
    p.add_argument("--shapes", nargs="+", default=["llama3-8b"], choices=list(SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=[32768, 131072])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--tile", nargs="+", type=int, default=[64, 128])
    p.add_argument("--num-warps", nargs="+", type=int, default=[1])
    p.add_argument("--num-stages", nargs="+", type=int, default=[2, 3])
    p.add_argument("--waves", nargs="+", type=int, default=[8, 12])
    p.add_argument("--maxnreg", nargs="+", type=int, default=[0], help="register caps per thread (0: none; "
                   "tensor_core only)")
    p.add_argument("--min-rows", nargs="+", type=int, default=[1], help="least M of the dots (tensor_core only; "
                   "16: the query rows padded to the tensor cores' M)")
    p.add_argument("--m-axis", nargs="+", default=["tokens"], choices=tk.tensor_core.M_AXES,
                   help="what the dots' M holds (tensor_core only): the query rows, or the tile's tokens")
    p.add_argument("--ol-chunk", nargs="+", type=int, default=[32], help="outlier entries per step (split_k only)")
    p.add_argument("--inline-table", nargs="+", type=int, default=[0], help="key blocks per step of the table each "
                   "split writes itself (tensor_core only; 0: a launch before the decode writes it)")
    p.add_argument("--tma", nargs="+", type=int, default=[0], help="the codes through tensor-memory-access "
                   "descriptors, that many tokens a copy row (1, 2, 4, 8; 0: pointers; tensor_core only, Hopper and "
                   "later)")
    p.add_argument("--qk-regs", nargs="+", type=int, default=[0], choices=(0, 1), help="the scaled query made in "
                   "registers each tile, no table (tensor_core only; tokens as M, inline_table 0)")
    p.add_argument("--at-rules", action="store_true", help="time each case at the launch its rule gives, once per "
                   "--tma value (an A/B of that knob alone); the other grid lists are ignored")
    p.add_argument("--write-rules", action="store_true")
    args = p.parse_args(argv)
    if args.at_rules and args.write_rules:
        p.error("--at-rules times the rules' launches; it writes no rules")
    if args.format != "uniform" and args.path != "split_k":  # before any cache is built
        p.error(f"--format {args.format} is read by the split_k path only, not {args.path}")
    try:
        for n in args.ol_chunk:
            tk.split_k.check_ol_chunk(n)
        for n in args.inline_table:
            tk.tensor_core.check_inline_table(n)
    except ValueError as e:
        p.error(str(e))
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/tune_decode.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    fmt = {} if args.format == "uniform" else {"format": args.format}  # rows without one are uniform
    rows = []
    grid = list(itertools.product(args.tile, args.num_warps, args.num_stages, args.waves, args.maxnreg, args.min_rows,
                                  args.m_axis, args.ol_chunk, args.inline_table, args.tma, args.qk_regs))
    grid = [g for g in grid if fits_qk_regs(g[-1], g[6], g[8])]
    try:
        for shape, batch, T, bits in itertools.product(args.shapes, args.batch, args.T, args.bits):
            hq, hkv, d = SHAPES[shape]
            torch.manual_seed(0)
            k = torch.randn(batch, hkv, T, d, dtype=torch.float16, device="cuda")
            v = torch.randn_like(k)
            q = torch.randn(batch, hq, d, dtype=torch.float16, device="cuda")
            kv = build_format(args.format, k, v, bits, argparse.Namespace(key_block=128, value_group=d, recent=128))
            del k, v
            best = None
            for tile, nw, ns, waves, maxnreg, min_rows, m_axis, ol_chunk, inline_table, tma, qk_regs in (
                    [(None,) * 9 + (t, 0) for t in args.tma] if args.at_rules else grid):
                knobs = {}  # --at-rules: the rule's launch
                if not args.at_rules:
                    knobs = dict(tile=tile, num_warps=nw, num_stages=ns, waves=waves)
                    if args.path == "tensor_core":  # always given: the rule may name others (maxnreg 0: none)
                        knobs.update(maxnreg=maxnreg or None, min_rows=min_rows, m_axis=m_axis,
                                     inline_table=inline_table, qk_regs=bool(qk_regs))
                    if args.path == "split_k":
                        knobs.update(ol_chunk=ol_chunk)
                if args.path == "tensor_core" and (tma or args.at_rules):
                    knobs.update(tma=tma)
                try:  # the rest of the launch (cuda_core's vec, fields) from the table's rule for this path
                    launch = tk.choose(q, kv, args.path, **knobs)
                except ValueError as e:
                    print(f"{shape} {bits}b: {e}", flush=True)
                    break
                knobs = {k: launch[k] for k in KNOBS if k in launch}
                fn = lambda: tk.decode_attention(q, kv, path=args.path, **knobs)  # noqa: E731
                try:
                    rel = rel_err_vs_reference(q, kv, fn())  # every launch: a fast wrong one must not win
                    if not rel <= REL_BAR:
                        raise ValueError(f"relative error {rel:.2e} against the reference twin")
                    us = bench_us(fn)
                except Exception as e:  # a launch the GPU refuses (shared memory, registers), or wrong numbers
                    print(f"{shape} B={batch} T={T} {bits}b {knobs}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                    continue
                knobs = {k: v for k, v in knobs.items() if k not in ("tma", "qk_regs") or v}  # rows without: off
                rows.append(dict(gpu=gpu, path=args.path, **fmt, shape=shape, batch=batch, T=T, bits=bits, **knobs,
                                 kernel_us=round(us, 2), rel_err_vs_reference=rel))
                if best is None or us < best["kernel_us"]:
                    best = rows[-1]
            print(f"BEST {shape} B={batch} T={T} {bits}b: {best}", flush=True)
            del kv
            torch.cuda.empty_cache()
    finally:  # an interrupted run keeps the rows it timed (its rules are not written)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(merged(args.out, rows), indent=1) + "\n")
    if args.write_rules:
        write_rules(rows, gpu, args.path)


def fits_qk_regs(qk_regs: int, m_axis: str, inline_table: int) -> bool:
    """Whether a grid launch's ``qk_regs`` goes with its ``m_axis`` and ``inline_table`` (the kernel's own check)."""
    try:
        tk.tensor_core.check_qk_regs(bool(qk_regs), m_axis, inline_table)
    except ValueError:
        return False
    return True


TUNED_FORMATS = ("uniform", "kvquant")  # one store each (qokv's mixed-width list is not a launch to tune)
KNOBS = tuple(k for k in tk.decode.KNOBS if k != "n_splits")  # a row's and a rule's knobs (splits follow waves)
CASE = ("gpu", "path", "format", "shape", "batch", "T", "bits")


def merged(out: Path, rows: list[dict]) -> list[dict]:
    """The rows already in ``out`` that this run did not re-time (same GPU, path, case and knobs), then ``rows``."""
    key = lambda r: tuple(r.get(x) for x in CASE + KNOBS)  # noqa: E731
    new = {key(r) for r in rows}
    old = json.loads(out.read_text()) if out.exists() else []
    return [r for r in old if key(r) not in new] + rows


def _best_knobs(rows: list[dict], best: dict) -> tuple | None:
    """The knobs with the least summed time relative to each case's best over ``rows``' cases, and their mean
    relative time; ``None`` when no launch ran every case."""
    rel = {}  # knobs -> case -> its least time relative to the case's best
    for r in rows:
        case = (r["shape"], r["batch"], r["T"], r["bits"])
        cases = rel.setdefault(tuple(r.get(x) for x in KNOBS), {})
        cases[case] = min(cases.get(case, float("inf")), r["kernel_us"] / best[case])
    n_cases = len({(r["shape"], r["batch"], r["T"]) for r in rows})
    score = {k: sum(v.values()) for k, v in rel.items() if len(v) == n_cases}  # launches that ran every case
    if not score:
        return None
    knobs = min(score, key=score.get)
    return knobs, score[knobs] / n_cases


def write_rules(rows: list[dict], gpu: str, path: str) -> None:
    """This GPU's rules for ``path`` in the tuning table: per bit width, the knobs with the least total
    relative time (time / the case's best) over the cases measured; GQA shapes give ``group: gqa`` rules.
    Where batch 1 and larger batches were both measured and their best knobs differ (or no launch ran both, as
    with rows timed at each batch's own rule), batch 1 gets its own rule (``max_batch: 1``, first) and the other
    rule is chosen on the larger batches. Rows of batch 1 alone say
    nothing of larger batches: they replace the batch-1 rule (``max_batch: 1``) and leave the others."""
    best = {}
    for r in rows:
        case = (r["shape"], r["batch"], r["T"], r["bits"])
        best[case] = min(best.get(case, float("inf")), r["kernel_us"])
    table = json.loads(tuning.TABLE_PATH.read_text())
    entry = table.setdefault(gpu, {"measured_on": gpu, "rules": []})
    for bits in sorted({r["bits"] for r in rows}):
        for group in ("gqa", "mha"):
            mine = [r for r in rows if r["bits"] == bits and (SHAPES[r["shape"]][0] != SHAPES[r["shape"]][1]) == (group == "gqa")]
            if not mine:
                continue
            chosen = _best_knobs(mine, best)
            one, more = ([r for r in mine if (r["batch"] == 1) == b1] for b1 in (True, False))
            when = {"group": group, "bits": [bits], **({} if more else {"max_batch": 1})}
            by_batch = [_best_knobs(x, best) for x in (one, more)] if one and more else [None]
            if None not in by_batch and (chosen is None or by_batch[0][0] != by_batch[1][0]):
                picks = [({**when, "max_batch": 1}, *by_batch[0]), (when, *by_batch[1])]
            elif chosen is not None:
                picks = [(when, *chosen)]
            else:
                print(f"no {group} {bits}-bit launch ran every case; its rule is left as it was", flush=True)
                continue
            entry["rules"] = without_width(entry["rules"], path, group, bits, None if more else 1)
            # split_k reads every format, so its rules go last: first, they would take the plain formats too
            at = len(entry["rules"]) if path == "split_k" else 0
            for i, (w, knobs, mean) in enumerate(picks):
                rule = {"when": w, "path": path, **{k: v for k, v in zip(KNOBS, knobs) if v is not None}}
                entry["rules"].insert(at + i, rule)
                print(f"rule {gpu}: {rule} (mean relative time {mean:.3f})", flush=True)
    entry["rules"] = merge_widths(entry["rules"])
    tuning.TABLE_PATH.write_text(tuning.dumps(table))


def without_width(rules: list[dict], path: str, group: str, bits: int, max_batch: int | None = None) -> list[dict]:
    """``rules`` less ``path``'s rules for ``group`` at ``bits`` (any ``max_batch``, or only those of
    ``max_batch``); a rule of several widths keeps its others."""
    out = []
    for x in rules:
        w = x["when"]
        if (x["path"] == path and w.get("group") == group and bits in w.get("bits", ())
                and max_batch in (None, w.get("max_batch"))):
            x = {**x, "when": {**w, "bits": [b for b in w["bits"] if b != bits]}}
            if not x["when"]["bits"]:
                continue
        out.append(x)
    return out


def _overlap(a: dict, b: dict) -> bool:
    """Whether two rules' ``when`` hold for a common shape (every rule holds for batch 1)."""
    return all(k not in a or k not in b or (a[k] == b[k] if k == "group" else set(a[k]) & set(b[k]))
               for k in ("group", "bits", "head_dim"))


def _but_bits(rule: dict) -> tuple[dict, dict]:
    """A rule's launch and its ``when`` without the widths."""
    return {k: v for k, v in rule.items() if k != "when"}, {k: v for k, v in rule["when"].items() if k != "bits"}


def merge_widths(rules: list[dict]) -> list[dict]:
    """Rules alike but for their widths, as one rule of all of them at the first one's place, where no rule
    between them holds for one of the later rule's shapes (so no shape changes its rule). A mixed-width store
    (QoKV's 3-bit keys with 2-bit values) matches a rule only if the rule holds both widths."""
    out = []
    for x in rules:
        for i, y in enumerate(out):
            if ("bits" in x["when"] and "bits" in y["when"] and _but_bits(x) == _but_bits(y)
                    and not any(_overlap(z["when"], x["when"]) for z in out[i + 1:])):
                out[i] = {**y, "when": {**y["when"], "bits": sorted({*y["when"]["bits"], *x["when"]["bits"]})}}
                break
        else:
            out.append(x)
    return out


if __name__ == "__main__":
    main()
