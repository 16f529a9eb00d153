"""Reports: golden LaTeX and Markdown from a fixture frame, missing/duplicate/seed handling, plots, paper.tex
compiles, include blocks.

The golden table is tests/fixtures/report/golden.tex (and its page golden.md), written by
tests/fixtures/report/make_golden.py from tests/fixtures/report/results_frame.json (made by make_frame.py
beside it) and spec.yaml.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kvbench import report
from kvbench.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "report"
NUMBER = re.compile(r"[-+]?\d+\.\d+|\d+")
ATOL = 0.011  # numbers are printed with 1-2 decimals: one unit of the last digit


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the .tex headers name specs by their path relative to the working directory


@pytest.fixture
def frame():
    return pd.DataFrame(json.loads((FIX / "results_frame.json").read_text()))


@pytest.fixture
def spec():
    return report.load_spec(FIX / "spec.yaml")


def split_numbers(text: str) -> tuple[str, list[float]]:
    return NUMBER.sub("<N>", text), [float(x) for x in NUMBER.findall(text)]


def assert_like_golden(text: str, golden: Path) -> None:
    """Text exact, numbers within ATOL."""
    got_text, got = split_numbers(text)
    want_text, want = split_numbers(golden.read_text())
    assert got_text == want_text, f"text differs from {golden.name} (rerun make_golden.py if intended)"
    assert len(got) == len(want)
    bad = [(g, w) for g, w in zip(got, want) if abs(g - w) > ATOL]
    assert not bad, f"numbers off by more than {ATOL}: {bad[:5]}"


def test_golden_tex(frame, spec, tmp_path):
    res = report.build(spec, frame, tmp_path, "runs")
    assert_like_golden(res["tex"].read_text(), FIX / "golden.tex")


def test_golden_markdown(frame, spec, tmp_path):
    """The Markdown page: the same cells as the LaTeX (values, +-, intervals, bold, marks), caption, notes, plots."""
    res = report.build(spec, frame, tmp_path, "runs")
    page = res["page"].read_text()
    assert_like_golden(page, FIX / "golden.md")
    t = res["table"]
    tex_rows = [line for line in res["tex"].read_text().splitlines() if line.endswith(r" \\") and " & " in line]
    md_rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| *")][1:]
    tex_rows = tex_rows[-len(t.spec["rows"]):]  # (after the group and header rows)
    assert len(md_rows) == len(t.spec["rows"])
    for row, tex_row, md_row in zip(t.spec["rows"], tex_rows, md_rows):
        assert tex_row.startswith(row["label"] + " & ") and md_row.startswith(f"| {row['label']} | ")
        assert split_numbers(tex_row)[1] == split_numbers(md_row)[1], (tex_row, md_row)
    assert "| int4 per-channel K | **12.99** ± " in page and "| *kv.bits = 3* |" in page
    assert "| Method | Perplexity: Wiki | Perplexity: Δ% | Perplexity: C4 | avg bits | saving (%) |" in page
    assert "![spec_pareto](spec_pareto.png)" in page and (tmp_path / "spec_pareto.png").exists()
    assert "python -m kvbench method=uniform" in page  # the missing runs' commands


def test_tex_to_md():
    assert report.tex_to_md(r"$\Delta$\% of 10/60/30\% at $b+1$/$b-1$ bits, ``avg'' acc\_norm") == \
        "Δ% of 10/60/30% at b+1/b-1 bits, “avg” acc_norm"
    assert report.tex_to_md(r"$\times$ 1 \texttt{cmd}, 95\,\%, \textbf{x}") == "× 1 `cmd`, 95 %, **x**"


def test_cells_values_seeds_and_best(frame, spec):
    t = report.build_table(frame, spec)
    labels = [r["label"] for r in t.spec["rows"]]
    cols = [c["label"] for c in t.columns]
    assert labels == ["fp16", "int4 per-token", "int4 per-channel K", "int3 per-token", "int3 per-channel K",
                      "int2 per-token", "int2 per-channel K"]  # grouped by kv.bits, reference first
    assert "WikiText-2" not in cols  # optional column without any run is left out
    cell = t.cells[labels.index("int3 per-token")][cols.index("Wiki")]
    assert cell.values == [15.91, 15.98, 16.02]  # three seeds: mean +- sample std
    assert cell.mean == pytest.approx(15.97) and cell.std == pytest.approx(0.05568, abs=1e-4)
    rel = t.cells[labels.index("int4 per-token")][cols.index(r"$\Delta$\%")]
    assert rel.mean == pytest.approx((13.10 / 12.857 - 1) * 100)
    assert report.best_rows(t, cols.index("Wiki")) == {labels.index("int4 per-channel K")}  # fp16 excluded
    tex = report.render_table(t, "cmd", "runs")
    assert r"15.97{\scriptsize$\pm$0.06}" in tex and r"\textbf{12.99}" in tex


def test_missing_cells_marked_and_listed(frame, spec, tmp_path, monkeypatch, capsys):
    t = report.build_table(frame, spec)
    labels = [r["label"] for r in t.spec["rows"]]
    assert t.cells[labels.index("int2 per-channel K")][0].missing
    tex = report.render_table(t, "cmd", "runs")
    row = next(line for line in tex.splitlines() if line.startswith("int2 per-channel K"))
    assert row.count(report.MISSING) == 4  # Wiki, C4, avg bits, saving (the Delta column shows --)
    expected = ("python -m kvbench method=uniform model=tiny data=wiki eval=ppl eval.seqlen=512 "
                "method.key_axis=channel kv.bits=2 output_dir=runs logging.wandb.mode=disabled")
    assert expected in t.missing and len(t.missing) == 4  # the avg-bits cell needs the same run: listed once
    monkeypatch.setattr(report, "load_frame", lambda source: frame)
    assert report.main([str(FIX / "spec.yaml"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "missing runs (4)" in out and expected in out
    assert f"%   {expected}" in (tmp_path / "spec.tex").read_text()


def test_duplicates_reported_not_averaged(frame, spec):
    t = report.build_table(frame, spec)
    labels = [r["label"] for r in t.spec["rows"]]
    cell = t.cells[labels.index("int4 per-channel K")][[c["label"] for c in t.columns].index("C4")]
    assert cell.values == [20.83] and cell.duplicate  # the newest run, not the mean 20.82
    assert len(t.duplicates) == 1 and "values DISAGREE" in t.duplicates[0] and "runs/default/uniform/dup" in t.duplicates[0]
    assert not t.cells[0][0].duplicate  # fp16 at kv.bits 4 and 2 (ignored, equal values): one experiment


def test_ambiguous_cell_names_the_differing_key(frame, tmp_path):
    text = (FIX / "spec.yaml").read_text().replace(", ignore: [kv.bits]", "")
    (tmp_path / "s.yaml").write_text(text)
    t = report.build_table(frame, report.load_spec(tmp_path / "s.yaml"))  # fp16 at kv.bits 4 and 2 (Wiki only)
    assert t.cells[0][0].ambiguous and not t.cells[0][0].values and not t.cells[0][0].missing
    assert len(t.ambiguous) == 3 and re.search(r"\(fp16, Wiki\).*differ in \['kv.bits'\]", t.ambiguous[0])
    tex = report.render_table(t, "cmd", "runs")
    assert r"fp16 & \textbf{?} & -- & 20.50{\scriptsize$\pm$0.89} & \textbf{?} & \textbf{?} \\" in tex.splitlines()
    assert "% Ambiguous cells" in tex


def _row(frame, run_id: str) -> dict:
    return frame[frame["run_id"] == run_id].iloc[0].to_dict()


def test_paired_interval_of_a_fixture_pair(frame, spec):
    """The Delta% interval of int4 per-token vs fp16 equals a paired percentile bootstrap written here."""
    t = report.build_table(frame, spec)
    labels, cols = [r["label"] for r in t.spec["rows"]], [c["label"] for c in t.columns]
    ref, new = _row(frame, "fp16-4-wiki-0"), _row(frame, "uniform-4-wiki-0")
    a, b = (np.array(json.loads(r["metrics.ppl_blocks.nll"])) for r in (ref, new))
    tokens = np.array(json.loads(ref["metrics.ppl_blocks.tokens"]), dtype=float)
    assert json.loads(new["metrics.ppl_blocks.tokens"]) == tokens.tolist()
    idx = np.random.default_rng(0).integers(0, len(a), size=(2000, len(a)))  # kvbench.stats: seed 0, 2000 resamples
    t_sum = tokens[idx].sum(1)
    change = 100 * (np.exp(b[idx].sum(1) / t_sum - a[idx].sum(1) / t_sum) - 1)
    lo, hi = np.percentile(change, [2.5, 97.5])
    cell = t.cells[labels.index("int4 per-token")][cols.index(r"$\Delta$\%")]
    assert cell.ci == pytest.approx((lo, hi), rel=1e-9) and lo > 0  # significant
    point = 100 * (math.exp((b.sum() - a.sum()) / tokens.sum()) - 1)
    assert lo < cell.mean < hi and cell.mean == pytest.approx(point, abs=1e-4)  # metrics.ppl agrees with its blocks
    unpaired = np.percentile(change, 97.5) - np.percentile(change, 2.5)
    ci_a, ci_b = json.loads(ref["metrics.ppl_ci95"]), json.loads(new["metrics.ppl_ci95"])
    assert unpaired < 0.2 * (ci_a[1] - ci_a[0]) / ref["metrics.ppl"] * 100  # pairing removes the shared text noise
    tex = report.render_table(t, "cmd", "runs")
    row = next(line for line in tex.splitlines() if line.startswith("int4 per-token"))
    assert rf"+{cell.mean:.1f}{{\scriptsize\,[{lo:+.1f}, {hi:+.1f}]}}" in row
    assert rf"13.10{{\scriptsize$\pm${(ci_b[1] - ci_b[0]) / 2:.2f}}}" in row  # +- half the run's own interval
    assert "paired 95" in tex


def test_not_significant_and_unpaired_cells(frame, spec):
    t = report.build_table(frame, spec)
    labels, cols = [r["label"] for r in t.spec["rows"]], [c["label"] for c in t.columns]
    delta = cols.index(r"$\Delta$\%")
    noisy = t.cells[labels.index("int4 per-channel K")][delta]
    assert noisy.ci[0] < 0 < noisy.ci[1] and noisy.mean > 0  # +1.0 %, not significant
    for label in ("int3 per-token", "int3 per-channel K", "int2 per-token"):  # seeds, other tokens, no blocks
        assert t.cells[labels.index(label)][delta].ci is None and t.cells[labels.index(label)][delta].values, label
    tex = report.render_table(t, "cmd", "runs")
    for label in ("int3 per-token", "int3 per-channel K", "int2 per-token"):
        row = next(line for line in tex.splitlines() if line.startswith(label))
        assert row.count(report.UNPAIRED) == 1, row
    assert report.UNPAIRED + ": no paired interval" in tex


def test_runs_of_an_older_results_version_are_marked_stale(tmp_path):
    """A run computed at an older RESULTS_VERSION stays visible, flagged, and the flag is explained."""
    from kvbench.report import markdown
    from kvbench.tracking import store

    base = {"model.name": "tiny", "eval.name": "ppl", "seed": 0}
    frame = pd.DataFrame([
        {**base, "method.name": "fp16", "metrics.ppl": 10.0, "run_dir": "r/a", "run_id": "a",
         "results_version": store.RESULTS_VERSION},
        {**base, "method.name": "uniform", "metrics.ppl": 11.0, "run_dir": "r/b", "run_id": "b",
         "results_version": store.RESULTS_VERSION - 1}])
    (tmp_path / "s.yaml").write_text("filters: {eval.name: ppl}\nrows:\n"
                                     "  - {label: fp16, match: {method.name: fp16}, reference: true}\n"
                                     "  - {label: int4, match: {method.name: uniform}}\n"
                                     "columns: [{label: ppl, metric: metrics.ppl}]\n")
    t = report.build_table(frame, report.load_spec(tmp_path / "s.yaml"))
    assert [line[0].stale for line in t.cells] == [False, True]
    tex = report.render_table(t, "cmd", "runs")
    from kvbench.report import latex

    assert next(x for x in tex.splitlines() if x.startswith("int4")).count(latex.STALE) == 1
    assert latex.STALE + ": a run of an older results version" in tex
    page = markdown.render_page(t, "cmd", "runs", tmp_path / "s.md", tmp_path)
    assert markdown.STALE + ": a run of an older results version" in page


def test_harness_cells_show_lm_eval_stderr(tmp_path):
    base = {"model.name": "tiny", "eval.name": "harness", "seed": 0}
    frame = pd.DataFrame([
        {**base, "method.name": "fp16", "metrics.tasks.piqa.acc": 0.7333, "metrics.tasks.piqa.acc_stderr": 0.0821,
         "run_dir": "r/a", "run_id": "a"},
        {**base, "method.name": "uniform", "metrics.tasks.piqa.acc": 0.7, "run_dir": "r/b", "run_id": "b"}])
    (tmp_path / "h.yaml").write_text("filters: {eval.name: harness}\nbest: max\ndecimals: 1\nrows:\n"
                                     "  - {label: fp16, match: {method.name: fp16}, reference: true}\n"
                                     "  - {label: int4, match: {method.name: uniform}}\n"
                                     "columns: [{label: PIQA, metric: metrics.tasks.piqa.acc, format: pct}]\n")
    tex = report.render_table(report.build_table(frame, report.load_spec(tmp_path / "h.yaml")), "cmd", "runs")
    lines = tex.splitlines()
    assert r"fp16 & 73.3{\scriptsize$\pm$8.2} \\" in lines and r"int4 & 70.0 \\" in lines
    assert "standard error (lm-evaluation-harness)" in tex and "half-width" not in tex


def test_spec_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("rows: [{label: x}]\ncolumns: [{label: y}]\ncaptoin: typo\n")
    with pytest.raises(UserError, match=r"unknown key\(s\) \['captoin'\]; valid keys: .*'caption'"):
        report.load_spec(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("rows: [{label: x, mach: {}}]\ncolumns: [{label: y}]\n")
    with pytest.raises(UserError, match=r"rows\[0\]: unknown key\(s\) \['mach'\]"):
        report.load_spec(tmp_path / "b.yaml")
    with pytest.raises(UserError, match="no such report spec"):
        report.load_spec(tmp_path / "nope.yaml")


def test_pareto_front():
    pts = [(4.5, 13.1), (4.5, 12.99), (3.5, 15.97), (3.5, 14.2), (2.5, 45.0), (4.0, 14.5)]
    assert report.pareto_front(pts) == [(2.5, 45.0), (3.5, 14.2), (4.5, 12.99)]


def _compile(folder: Path) -> Path:
    """pdflatex paper.tex in ``folder``, then its first page to PNG; returns the PNG."""
    for _ in range(2):  # twice, for references
        r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"], cwd=folder,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-3000:]
    subprocess.run(["pdftoppm", "-png", "-r", "60", "-f", "1", "-l", "1", "-singlefile", "paper.pdf", "page1"],
                   cwd=folder, check=True, timeout=60)
    png = folder / "page1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    return png


needs_latex = pytest.mark.skipif(not (shutil.which("pdflatex") and shutil.which("pdftoppm")),
                                 reason="pdflatex/pdftoppm not installed (.ci/run installs them)")


@needs_latex
def test_paper_from_fixture_compiles(frame, tmp_path, monkeypatch):
    shutil.copy(FIX / "spec.yaml", tmp_path / "ppl.yaml")
    monkeypatch.setattr(report, "load_frame", lambda source: frame)
    monkeypatch.chdir(tmp_path)  # the pages go to docs/results below the working directory
    assert report.main(["--all", str(tmp_path)]) == 0
    assert "| int4 per-channel K |" in (tmp_path / "docs" / "results" / "ppl.md").read_text()
    paper = (tmp_path / "paper.tex").read_text()
    assert r"\input{ppl}" in paper and "ppl_pareto.pdf" in paper and "ppl_drop.pdf" in paper
    for name in ("ppl.tex", "ppl_pareto.pdf", "ppl_pareto.png", "ppl_drop.pdf", "ppl_drop.png"):
        assert (tmp_path / name).stat().st_size > 0
    _compile(tmp_path)
    text = subprocess.run(["pdftotext", "paper.pdf", "-"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert "int4 per-channel K" in text and "12.99" in text


def test_checked_in_paper_includes_every_spec():
    paper = (ROOT / "reports" / "paper.tex").read_text()
    for path in report.spec_paths(ROOT / "reports"):
        spec = report.load_spec(path)
        assert f"\\input{{{spec['name']}}}" in paper, f"paper.tex misses table {spec['name']}"
        assert (ROOT / "reports" / f"{spec['name']}.tex").exists()
        for p in spec["plots"]:
            assert f"{p['name']}.pdf" in paper and (ROOT / "reports" / f"{p['name']}.png").exists()


@needs_latex
def test_checked_in_paper_compiles(tmp_path):
    src = ROOT / "reports"
    for f in list(src.glob("*.tex")) + list(src.glob("*.pdf")):
        if f.name != "paper.pdf":
            shutil.copy(f, tmp_path / f.name)
    _compile(tmp_path)


def test_run_missing_end_to_end(tmp_path):
    """From an empty store: --run-missing runs the listed kvbench commands (tiny model), then reports."""
    runs, text = tmp_path / "runs", tmp_path / "text.txt"
    text.write_text("\n\n".join(f"The quick brown fox jumps over the lazy dog number {i}. " * 4 for i in range(20)))
    (tmp_path / "t.yaml").write_text(f"""
caption: tiny end to end
runs: {runs}
filters: {{model.name: tiny-llama, data.name: text, data.path: {text}, eval.seqlen: 32, eval.max_windows: 1}}
overrides: [logging.wandb.mode=disabled, logging.progress=false]
rows:
  - {{label: fp16, match: {{method.name: fp16}}, reference: true}}
  - {{label: int2, match: {{method.name: uniform, kv.bits: 2}}}}
columns:
  - {{label: ppl, relative: pct}}
  - {{label: avg bits, metric: metrics.avg_bits, best: none}}
""")
    spec = report.load_spec(tmp_path / "t.yaml")
    assert len(report.build_table(report.load_frame(str(runs)), spec).missing) == 2
    r = subprocess.run([sys.executable, "-m", "kvbench.report", str(tmp_path / "t.yaml"), "--run-missing"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    t = report.build_table(report.load_frame(str(runs)), spec)
    assert not t.missing and len(list(runs.glob("**/metrics.json"))) == 2
    fp16, int2 = t.cells[0][0].mean, t.cells[1][0].mean
    assert fp16 > 1 and int2 != fp16 and t.cells[1][2].mean == pytest.approx(2 + 32 / 16)  # tiny head_dim 16
    assert "missing runs" not in r.stdout and (tmp_path / "t.tex").exists()
    assert "| int2 |" in (tmp_path / "docs" / "results" / "t.md").read_text()


def test_checked_in_specs_missing_commands_compose():
    """The command printed for each missing cell of every checked-in spec composes, and its run fits the cell."""
    import shlex

    from kvbench.tracking import store as results
    from kvbench.config import compose

    seen = set()
    for path in report.spec_paths(ROOT / "reports"):
        spec = report.load_spec(path)
        t = report.build_table(pd.DataFrame(), spec)
        assert len(t.missing) >= len(spec["rows"]), path  # an empty store: at least one run per row is missing
        for cell in (c for line in t.cells for c in line if c.missing and c.selector):
            cmd = report.command_for(cell.selector, spec)
            assert cmd in t.missing
            shape = (path.name, tuple(sorted(cell.selector)))  # one command per set of keys (Hydra is slow)
            if shape in seen:
                continue
            seen.add(shape)
            argv = shlex.split(cmd)
            assert argv[:3] == ["python", "-m", "kvbench"]
            cfg = compose(argv[3:])
            from omegaconf import OmegaConf

            row = pd.DataFrame([results.flatten(OmegaConf.to_container(cfg, resolve=True))])  # as config.yaml stores it
            assert report.matches(row, cell.selector).all(), cmd
    assert len(seen) >= 10


def test_declared_seeds_list_the_missing_ones(frame, tmp_path):
    (tmp_path / "s.yaml").write_text((FIX / "spec.yaml").read_text() + "seeds: [0, 1, 2]\n")
    t = report.build_table(frame, report.load_spec(tmp_path / "s.yaml"))
    per_token3 = [m for m in t.missing if "method.key_axis=token kv.bits=3" in m and "data=wiki" in m]
    assert per_token3 == []  # int3 per-token on wiki has seeds 0, 1, 2
    assert any(m.endswith("kv.bits=4 seed=2 output_dir=runs logging.wandb.mode=disabled") and "data=c4" in m
               and "key_axis=token" in m for m in t.missing)


def test_include_blocks(tmp_path, capsys):
    """A block gets its file's content (relative links rebased, headings below the block's own), is refreshed
    in place, and a missing file leaves it empty with a warning."""
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "drift.md").write_text("# Drift\n\n```bash\n# a comment\n```\n| a | b |\n|---|---|\n"
                                                 "| 1 | 2 |\n\n![plot](drift.png) [web](https://x.org/a.md) [top](#top)\n")
    readme = tmp_path / "README.md"
    readme.write_text("# kvbench\n## Design\n<!-- include: bench/drift.md -->\nstale\n<!-- end include -->\nend\n")
    page = tmp_path / "docs" / "guide.md"
    example = "```markdown\n<!-- include: bench/drift.md -->\n<!-- end include -->\n```\n"  # shown, not filled
    page.write_text("<!-- include: bench/drift.md -->\n<!-- end include -->\n" + example +
                    "<!-- include: bench/nope.md -->\nold\n<!-- end include -->\n")
    assert report.refresh_includes(tmp_path) == [readme, page]
    assert readme.read_text() == ("# kvbench\n## Design\n<!-- include: bench/drift.md -->\n"
                                  "### Drift\n\n```bash\n# a comment\n```\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                                  "![plot](bench/drift.png) [web](https://x.org/a.md) [top](#top)\n"
                                  "<!-- end include -->\nend\n")
    text = page.read_text()
    assert text.startswith("<!-- include: bench/drift.md -->\n# Drift\n") and "![plot](../bench/drift.png)" in text
    assert text.endswith(example + "<!-- include: bench/nope.md -->\n<!-- end include -->\n")
    assert "bench/nope.md: no such file" in capsys.readouterr().err
    assert report.refresh_includes(tmp_path) == []  # idempotent


def test_cli_writes_page_and_refreshes_includes(frame, tmp_path, monkeypatch):
    """From the repository root: reports/x.yaml -> reports/x.tex, docs/results/x.md, and the README's block."""
    (tmp_path / "reports").mkdir()
    shutil.copy(FIX / "spec.yaml", tmp_path / "reports" / "ppl.yaml")
    (tmp_path / "README.md").write_text("# x\n<!-- include: docs/results/ppl.md -->\n<!-- end include -->\n")
    monkeypatch.setattr(report, "load_frame", lambda source: frame)
    monkeypatch.chdir(tmp_path)
    assert report.main(["reports/ppl.yaml"]) == 0
    page = (tmp_path / "docs" / "results" / "ppl.md").read_text()
    assert "![ppl_pareto](../../reports/ppl_pareto.png)" in page and "[ppl.tex](../../reports/ppl.tex)" in page
    assert "rebuilt by `python -m kvbench.report reports/ppl.yaml`" in page
    readme = (tmp_path / "README.md").read_text()
    assert "![ppl_pareto](reports/ppl_pareto.png)" in readme and "| int4 per-channel K |" in readme


def test_relative_diff_of_a_percent_column_is_in_points():
    """``relative: diff`` on a ``format: pct`` column shows the change in percentage points (0.6 vs 1.0: -40)."""
    import pandas as pd

    from kvbench.report.latex import format_cell
    from kvbench.report.table import build_table, expand_columns

    spec = {"name": "t", "path": Path("t.yaml"), "filters": {}, "ignore": [], "seeds": None, "sections": None, "best": "max",
            "rows": [{"label": "fp16", "match": {"method.name": "fp16"}, "reference": True, "ignore": []},
                     {"label": "int4", "match": {"method.name": "uniform"}, "reference": False, "ignore": []}],
            "columns": [{"label": "acc", "group": None, "match": {}, "metric": "metrics.acc", "decimals": 0, "best": "max",
                         "format": "pct", "relative": "diff", "average": None, "ignore": [], "optional": False, "missing": None}]}
    frame = pd.DataFrame({"method.name": ["fp16", "uniform"], "metrics.acc": [1.0, 0.6], "run_dir": ["a", "b"]})
    table = build_table(frame, spec)
    cols = expand_columns(spec)
    assert cols[1]["kind"] == "relative" and cols[1]["format"] == "pct"
    assert table.cells[1][1].mean == pytest.approx(-0.4)
