"""The cost of a run (issue 16): format names, the benchmark lookup, the derived report columns, and the decode
benchmark's ``--formats`` smoke run on a CPU (Triton interpreter)."""

import argparse
import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kvbench.kernels import ops, reference, tuning  # noqa: E402
from kvbench.kernels import triton as tk  # noqa: E402
from kvbench.kernels.records import PLAIN, decode_cost, format_name, lookup  # noqa: E402
from kvbench.report.cost import add_cost_columns  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _kv(**kw):
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64)
    return k, v, ops.build_packed_kv(k, v, 4, 4, 32, 64, impl="reference", **kw)



def _benchmark(name: str, monkeypatch):
    """``benchmarks/<name>.py`` as a module (``benchmarks/`` on the path, as when it is run: it imports its
    neighbours)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_format_names():
    _, _, plain = _kv()
    assert format_name(plain) == PLAIN
    _, _, kvq = _kv(inv_freq=reference.default_inv_freq(64), value_outlier_frac=0.02,
                    k_lut=ops.codebook_from_unit(torch.linspace(-1, 1, 16), 4).expand(2, 64, 16).contiguous(),
                    k_clamp=(torch.full((2, 64), -2.0), torch.full((2, 64), 2.0)))
    assert format_name(kvq) == "k-channel+nuq+pre-rope+k-outliers+v-outliers"
    k, v, _ = _kv()
    mixed = ops.build_mixed_kv(k, v, torch.arange(64)[None] % 3, [(4, 5), (4, 4), (4, 3)], key_block=32,
                               key_group=64, value_group=64, impl="reference",
                               k_chan=torch.stack([torch.ones(2, 64), torch.zeros(2, 64)]))
    assert format_name(mixed) == "k-token+channel-affine+mixed-4:3/4:4/4:5"


def test_lookup_and_cpu_decode_cost():
    """On a CPU the decode time comes from a record of the same format, shape, bits and context, or is None
    with the reason; the checked-in H200 rows (no ``format`` field) are the plain format."""
    rows = json.loads((ROOT / "benchmarks/results/decode_attention.json").read_text())
    rec = lookup(rows, PLAIN, 4, 32, 8, 128, 32768)
    assert rec is not None and rec["shape"] == "llama3-8b" and "H200" in rec["gpu"]
    assert lookup(rows, "k-token", 4, 32, 8, 128, 32768) is None
    _, _, kv = _kv()
    fake = [{"format": PLAIN, "bits": 4, "h_q": 4, "h_kv": 2, "head_dim": 64, "T": 64, "batch": 1, "gpu": "G",
             "kernel_us": 7.0}]
    got = decode_cost([kv, kv, kv], 4, 4, 64, records=fake)
    assert got["decode_us_per_token"] == 21.0 and got["decode_us_source"].startswith("decode_attention.json (G)")
    none = decode_cost([kv], 4, 3, 64, records=fake)
    assert none["decode_us_per_token"] is None and none["decode_us_source"].startswith("none:")


def test_cost_columns():
    frame = pd.DataFrame({
        "method.name": ["fp16", "uniform", "qokv"], "kv.bits": [16, 4, 4],
        "metrics.kv_format": [None, PLAIN, "k-token+mixed-4:3/4:4"],
        "metrics.kv_bytes_per_token": [None, 30.0, 40.0],
        "metrics.model.layers": [2] * 3, "metrics.model.kv_heads": [2] * 3, "metrics.model.head_dim": [8] * 3})
    records = [{"shape": "s", "T": 32768, "batch": 1, "bits": 4, "speedup_vs_best_fp16": 1.5}]
    out = add_cost_columns(frame, records)
    assert out["metrics.kv_bytes_per_token"].tolist()[0] == 4 * 2 * 2 * 8
    assert out["metrics.kv_bytes_saving"].tolist()[1] == 1 - 30 / 128
    speed = out["metrics.decode_speedup.s.32k"].tolist()
    assert speed[:2] == [1.0, 1.5] and pd.isna(speed[2])  # no record of QoKV's format: an empty cell


def test_benchmark_formats_smoke(tmp_path, monkeypatch):
    """``benchmarks/decode_attention.py --smoke --formats ...`` on a CPU: one record per format and width, each
    naming its method and format, the kernel within the reference twin's tolerance."""
    bench = _benchmark("decode_attention", monkeypatch)
    bench.main(["--smoke", "--out", str(tmp_path), "--formats", "uniform", "kvquant", "qokv", "--bits", "4", "3"])
    rows = json.loads((tmp_path / "decode_attention.json").read_text())
    assert sorted((r["method"], r["bits"]) for r in rows) == sorted(
        (m, b) for m in ("uniform", "kvquant", "qokv") for b in (4, 3))
    by = {(r["method"], r["bits"]): r for r in rows}
    assert by["qokv", 4]["format"] == "k-token+pre-rope+channel-affine+mixed-4:3/4:4/4:5"
    assert by["kvquant", 3]["format"] == "k-channel+nuq+pre-rope+k-outliers+v-outliers"
    assert all(r["rel_err_vs_reference"] < 2e-3 and r["path"] == "split_k" for r in rows if r["method"] != "uniform")
    assert {r["l2_flush"] for r in rows} == {"read"}  # the flush is recorded
    with pytest.raises(ValueError, match="flush must be one of"):
        bench.bench_us(lambda: None, flush="zero")
    # the benchmark's caches hold their counts on the GPU as the cache does (no fills timed with each decode)
    k, v = torch.randn(2, 2, 2, 80, 64).unbind(0)  # 64 packed tokens and 16 recent
    args = argparse.Namespace(key_block=32, value_group=64, recent=16)
    for fmt in ("uniform", "qokv"):
        kv = bench.build_format(fmt, k, v, 4, args)
        for store in kv if isinstance(kv, list) else [kv]:
            assert (store.packed_len.item(), store.recent_len.item()) == (store.n_packed, store.n_recent)
    for part in bench.KVQUANT_PARTS:  # one KVQuant component alone on the uniform format
        assert format_name(bench.build_format(part, k, v, 4, args)) == f"{PLAIN}+{part}"
    plain = bench.plain_cache(*torch.randn(2, 1, 2, 384, 64).unbind(0), 4)  # what tune_decode/ncu_decode time
    assert format_name(plain) == PLAIN and plain.key_block == 128 and plain.n_recent == 128
    assert (plain.packed_len.item(), plain.recent_len.item()) == (256, 128)


def test_roofline_floors_from_the_records(monkeypatch):
    """``benchmarks/roofline.py`` on the checked-in records: each case gets the byte floor (packed bytes over copy
    bandwidth) and the issue floor (codes read x instructions per code over the issue rate), checked here by hand
    for the largest case of each shape (``cuda_core``, not on the H200 now, reads a KV head once per query head)."""
    roof = _benchmark("roofline", monkeypatch)
    records = json.loads((ROOT / "benchmarks/results/decode_attention.json").read_text())
    sass = json.loads((ROOT / "benchmarks/results/kernel_sass.json").read_text())
    table = roof.rows(records, sass, "NVIDIA H200", 132, 1.98)
    assert {(r["shape"], r["bits"]) for r in table} == {(s, b) for s in ("llama3-8b", "llama2-7b") for b in (2, 3, 4)}
    timed = [r for r in records if r["gpu"] == "NVIDIA H200" and r["path"] in ("tensor_core", "cuda_core")
             and r.get("method", "uniform") == "uniform"]
    assert len(table) == len(timed)  # every launch timed has its count (a batch-1 rule's too)
    for path, shape, G, reads in (("tensor_core", "llama3-8b", 4, 8), ("tensor_core", "llama2-7b", 1, 32)):
        got = next(r for r in table if r["path"] == path and r["shape"] == shape and r["bits"] == 4 and r["batch"] == 8
                   and r["T"] == 131072)
        rec = next(r for r in records if r["gpu"] == "NVIDIA H200" and r["shape"] == shape and r["bits"] == 4
                   and r["batch"] == 8 and r["T"] == 131072 and r.get("method", "uniform") == "uniform")
        knobs = rec["tuning"]
        ipc = next(s["thread_instr_per_code"] for s in sass if s["path"] == path and s["G"] == G and s["bits"] == 4
                   and all(s.get(k) == knobs.get(k) for k in ("tile", "num_warps", "num_stages", "maxnreg"))
                   and (s.get("min_rows") or 16) == (knobs.get("min_rows") or 16)
                   and (s.get("m_axis") or "group") == (knobs.get("m_axis") or "group")
                   and (s.get("inline_table") or 0) == (knobs.get("inline_table") or 0)
                   and int(s.get("tma") or 0) == int(knobs.get("tma") or 0)
                   and bool(s.get("qk_regs")) == bool(knobs.get("qk_regs")))
        codes = 8 * reads * (131072 - 128) * 128 * 2
        assert got["bytes_floor_us"] == round(rec["packed_bytes"] / rec["copy_GBps"] / 1e3, 1)
        assert got["issue_floor_us"] == round(codes * ipc / (132 * 4 * 32 * 1.98e9) * 1e6, 1)
        # a kernel that only reads may pass the copy's bandwidth (read and write) by a few percent: MHA 4-bit, 1.03
        assert 0 < got["bytes_share"] < 1.1 and 0 < got["issue_share"] < 1


def test_tune_decode_merges_rows_and_writes_the_least_relative_time_rule(tmp_path, monkeypatch, capsys):
    """``benchmarks/tune_decode.py``: a run replaces only the rows it re-timed (same GPU, path, case, knobs); its
    rule per bit width is the launch with the least summed time relative to each case's best (by hand here)."""
    import sys

    tune = _benchmark("tune_decode", monkeypatch)
    assert "decode_attention" in sys.modules

    def row(T, tile, us):
        return dict(gpu="G", path="tensor_core", shape="llama3-8b", batch=8, T=T, bits=4, tile=tile, num_warps=1,
                    num_stages=2, waves=8, min_rows=1, kernel_us=us)

    out = tmp_path / "tune.json"
    out.write_text(json.dumps([row(1, 64, 10.0), row(1, 128, 20.0)]))
    assert tune.merged(out, [row(1, 64, 12.0)]) == [row(1, 128, 20.0), row(1, 64, 12.0)]

    # tile 64: 10/10 + 100/88 = 2.14; tile 128: 20/10 + 88/88 = 3.0 -> 64 (the least total time, 108 us, is 128's)
    rows = [row(1, 64, 10.0), row(2, 64, 100.0), row(1, 128, 20.0), row(2, 128, 88.0)]
    table = tmp_path / "tuning.json"
    table.write_text(json.dumps({"default": {"measured_on": "X", "rules": []}}))
    monkeypatch.setattr(tune.tuning, "TABLE_PATH", table)
    tune.write_rules(rows, "G", "tensor_core")
    rule = json.loads(table.read_text())["G"]["rules"][0]
    assert rule == {"when": {"group": "gqa", "bits": [4]}, "path": "tensor_core", "tile": 64, "num_warps": 1,
                    "num_stages": 2, "waves": 8, "min_rows": 1}

    # a launch timed twice counts its better time; one that missed a case (tile 32) is not a candidate, though its
    # time sets that case's best: 64: 10/9 + 100/88 = 2.25, 128: 20/9 + 88/88 = 3.22
    tune.write_rules(rows + [row(1, 64, 11.0), row(1, 32, 9.0)], "G", "tensor_core")
    assert json.loads(table.read_text())["G"]["rules"][0] == rule
    # no launch ran every case: the width keeps its rule, and says so in one line
    tune.write_rules([row(1, 32, 9.0), row(2, 128, 88.0)], "G", "tensor_core")
    assert json.loads(table.read_text())["G"]["rules"] == [rule]
    assert "no gqa 4-bit launch ran every case" in capsys.readouterr().out
    # bad arguments: one line each, before any cache is built (here, before the CUDA check)
    for argv, says in ((["--format", "kvquant"], "is read by the split_k path only, not tensor_core"),
                       (["--path", "split_k", "--ol-chunk", "16", "24"], "ol_chunk must be a power of two of at least 16, got 24"),
                       (["--inline-table", "0", "3"], "inline_table must be 0 or a power of two, got 3"),
                       (["--at-rules", "--write-rules"], "--at-rules times the rules' launches; it writes no rules")):
        with pytest.raises(SystemExit):
            tune.main(argv)
        assert says in capsys.readouterr().err


def test_tune_decode_gives_batch_1_its_own_rule_where_its_best_differs(tmp_path, monkeypatch):
    """Batch 1 and batch 8 measured, their best launches differ: a ``max_batch: 1`` rule (batch 1's best) goes
    before the rule chosen on batch 8, and the dispatcher's rules follow the batch; a later run whose classes
    agree replaces both with one rule; a run of batch 1 alone writes and replaces the batch-1 rule only."""
    tune = _benchmark("tune_decode", monkeypatch)
    table = tmp_path / "tuning.json"
    table.write_text(json.dumps({"default": {"measured_on": "X", "rules": []}}))
    monkeypatch.setattr(tune.tuning, "TABLE_PATH", table)

    def row(batch, inline, us):
        return dict(gpu="G", path="tensor_core", shape="llama3-8b", batch=batch, T=1, bits=2, tile=64, num_warps=1,
                    num_stages=3, waves=8, inline_table=inline, kernel_us=us)

    # over both batches inline 0 would win (10/9 + 50/50 = 2.11 against 9/9 + 60/50 = 2.2); batch 1 alone takes 2
    rows = [row(1, 0, 10.0), row(1, 2, 9.0), row(8, 0, 50.0), row(8, 2, 60.0)]
    tune.write_rules(rows, "G", "tensor_core")
    rules = json.loads(table.read_text())["G"]["rules"]
    base = {"path": "tensor_core", "tile": 64, "num_warps": 1, "num_stages": 3, "waves": 8}
    assert rules == [{"when": {"group": "gqa", "bits": [2], "max_batch": 1}, **base, "inline_table": 2},
                     {"when": {"group": "gqa", "bits": [2]}, **base, "inline_table": 0}]
    tuning.table.cache_clear()
    monkeypatch.setattr(tuning, "TABLE_PATH", table)
    try:
        assert [tuning.rules("G", 4, 2, 2, 128, batch=b)[0]["inline_table"] for b in (1, 2, 8)] == [2, 0, 0]
    finally:
        tuning.table.cache_clear()
    tune.write_rules([row(1, 0, 9.0), row(1, 2, 10.0), row(8, 0, 50.0), row(8, 2, 60.0)], "G", "tensor_core")
    assert json.loads(table.read_text())["G"]["rules"] == [{"when": {"group": "gqa", "bits": [2]}, **base,
                                                           "inline_table": 0}]
    # rows of batch 1 alone: a batch-1 rule, the larger batches' rule kept
    tune.write_rules([row(1, 0, 10.0), row(1, 2, 9.0)], "G", "tensor_core")
    assert json.loads(table.read_text())["G"]["rules"] == [rules[0], rules[1]]
    tune.write_rules([row(1, 0, 9.0), row(1, 2, 10.0)], "G", "tensor_core")  # it replaces the batch-1 rule only
    assert json.loads(table.read_text())["G"]["rules"] == [{**rules[0], "inline_table": 0}, rules[1]]
    # no launch ran both batches (rows timed at each batch's rule): each batch's best is its rule
    at_rules = [row(1, 0, 10.0), row(1, 2, 9.0), {**row(8, 0, 50.0), "tile": 128}, {**row(8, 2, 60.0), "tile": 128}]
    tune.write_rules(at_rules, "G", "tensor_core")
    assert json.loads(table.read_text())["G"]["rules"] == [rules[0], {**rules[1], "tile": 128}]


def test_tune_decode_merges_rules_alike_but_for_their_widths(monkeypatch):
    """Rules alike but for their widths become one rule of all of them where no rule between them holds for a
    shape of the later one (no shape changes its rule); re-tuning one width takes it out of a merged rule only;
    a mixed-width store (keys 3 bits, values 2) then finds the merged rule."""
    tune = _benchmark("tune_decode", monkeypatch)
    knobs = {"path": "tensor_core", "tile": 64}
    sk = {"path": "split_k", "tile": 128}
    rules = [{"when": {"group": "gqa", "bits": [2]}, **knobs},
             {"when": {"group": "gqa", "bits": [3], "max_batch": 1}, **knobs, "inline_table": 2},
             {"when": {"group": "gqa", "bits": [3]}, **knobs},  # the batch-1 rule above holds for its shapes
             {"when": {"group": "gqa", "bits": [4]}, **knobs},
             {"when": {"group": "mha", "bits": [2]}, **sk},
             {"when": {"group": "mha", "bits": [3]}, **sk}]
    merged = tune.merge_widths(rules)
    assert merged == [{"when": {"group": "gqa", "bits": [2, 4]}, **knobs}, rules[1], rules[2],
                      {"when": {"group": "mha", "bits": [2, 3]}, **sk}]
    for batch in (1, 8):  # every shape keeps its rule
        for bits in (2, 3, 4):
            pick = lambda rs: next(r for r in rs if tuning.matches(r["when"], 4, bits, bits, 128, batch))  # noqa: E731
            assert {k: v for k, v in pick(merged).items() if k != "when"} == \
                {k: v for k, v in pick(rules).items() if k != "when"}
    assert tune.without_width(merged, "tensor_core", "gqa", 4)[0]["when"]["bits"] == [2]
    assert tune.without_width(merged, "split_k", "mha", 3)[-1]["when"]["bits"] == [2]
    assert tuning.matches(merged[-1]["when"], 1, 3, 2, 128) and not tuning.matches(rules[-1]["when"], 1, 3, 2, 128)


def test_tune_decode_puts_split_k_rules_after_the_plain_paths(tmp_path, monkeypatch):
    """``split_k`` reads every format, so a tuned split_k rule goes after the GPU's other rules: placed first, it
    would take the plain formats from their faster paths (the dispatcher takes the first rule whose path applies)."""
    tune = _benchmark("tune_decode", monkeypatch)
    table = tmp_path / "tuning.json"
    plain = {"when": {"group": "gqa", "bits": [4]}, "path": "tensor_core", "tile": 64, "num_warps": 1,
             "num_stages": 3, "waves": 8}
    table.write_text(json.dumps({"default": {"measured_on": "X", "rules": []},
                                 "G": {"measured_on": "G", "rules": [plain]}}))
    monkeypatch.setattr(tune.tuning, "TABLE_PATH", table)
    row = dict(gpu="G", path="split_k", format="kvquant", shape="llama3-8b", batch=8, T=1, bits=4, tile=128,
               num_warps=4, num_stages=2, waves=4, ol_chunk=16, kernel_us=1.0)
    tune.write_rules([row], "G", "split_k")
    rules = json.loads(table.read_text())["G"]["rules"]
    assert rules == [plain, {"when": {"group": "gqa", "bits": [4]}, "path": "split_k", "tile": 128, "num_warps": 4,
                             "num_stages": 2, "waves": 4, "ol_chunk": 16}]
    monkeypatch.setattr(tuning, "TABLE_PATH", table)  # the dispatcher reads the table written
    tuning.table.cache_clear()
    monkeypatch.setattr(tuning, "gpu_name", lambda device: "G")
    try:
        q, k, v = torch.randn(1, 4, 128), torch.randn(1, 1, 64, 128), torch.randn(1, 1, 64, 128)
        plain_kv = ops.build_packed_kv(k, v, 4, 4, 32, 128, impl="reference")
        nuq_kv = ops.build_packed_kv(k, v, 4, 4, 32, 128, k_lut=torch.linspace(-1, 1, 16).expand(1, 128, 16),
                                     impl="reference")
        assert tk.choose(q, plain_kv)["path"] == "tensor_core"
        assert tk.choose(q, nuq_kv) | {"gpu": None, "measured_on": None} == {
            "path": "split_k", "tile": 32, "num_warps": 4, "num_stages": 2, "waves": 4, "ol_chunk": 16, "gpu": None,
            "measured_on": None}  # tile cut to the key block
    finally:
        tuning.table.cache_clear()


def test_ncu_source_summary_ranks_instructions_by_stall_samples(monkeypatch):
    """``ncu_decode.py --source``: from ncu's per-instruction CSV, the samples by reason (their shares summing to
    the total) and the instruction with the most samples first, after the instructions it follows."""
    ncu = _benchmark("ncu_decode", monkeypatch)
    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_long_sb", "stall_wait",
            "stall_long_sb (Not Issued)"]
    body = [["0x0", "LDG R1", "2", "0", "2", "0"], ["0x10", "SYNCS.TRYWAIT P0", "1", "0", "1", "0"],
            ["0x20", "@!P0 BRA 0x0", "12", "11", "1", "11"], ["0x30", "HMMA R2", "-", "-", "-", "-"]]
    table = "\n".join(",".join(f'"{x}"' for x in r) for r in [["Kernel Name", "k"], head, *body])
    text = ncu.source_summary(table, top=2, before=2)
    lines = text.splitlines()
    assert lines[0] == "stall samples: 15 over 4 instructions"
    assert lines[1].split() == ["long_sb", "11", "73.3%"] and lines[2].split() == ["wait", "4", "26.7%"]
    first = lines.index("12 samples (80.0%; long_sb 11) at @!P0 BRA 0x0")
    assert lines[first + 1:first + 3] == ["    LDG R1", "    SYNCS.TRYWAIT P0"]
    assert lines[first + 3] == "" and lines[first + 4] == "2 samples (13.3%; wait 2) at LDG R1"  # then the next


def test_e2e_records_the_launch_each_packed_cache_decodes_with(monkeypatch):
    """``e2e.py``'s packed runs record the path and launch the tuning table gives their cache's decode: here (no
    GPU: the table's ``default`` rules) a GQA cache of uniform codes, head_dim 128, goes to ``tensor_core`` with
    the tile cut to the key block, a pre-RoPE one to ``split_k`` (the one path that rotates keys)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbench.cache import PackedCacheSpec, make_packed_cache

    e2e = _benchmark("e2e", monkeypatch)
    cfg = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    for pre_rope, want in ((False, {"path": "tensor_core", "tile": 32, "num_warps": 4, "num_stages": 1, "waves": 4}),
                           (True, {"path": "split_k", "tile": 32, "num_warps": 4, "num_stages": 2, "waves": 4})):
        spec = PackedCacheSpec(impl="reference", key_bits=4, value_bits=4, value_group_size=128, key_block=32,
                               recent_window=4, pre_rope=pre_rope)
        cache = make_packed_cache(model.config, spec)
        with torch.no_grad():
            model(torch.randint(0, 97, (2, 70)), past_key_values=cache, use_cache=True)
        got = e2e.decode_launch(cache, cfg.num_attention_heads, 2, "auto")
        assert got == {**want, "measured_on": "NVIDIA H100 80GB HBM3"}, got
