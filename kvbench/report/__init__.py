"""Paper tables (booktabs LaTeX), their Markdown pages and plots, rebuilt from the results store by one command.

``python -m kvbench.report reports/<spec>.yaml`` (or ``--all`` for every ``reports/*.yaml``) reads the
results frame (:func:`kvbench.tracking.store.load`: one row per run, dotted config columns + ``metrics.*``)
and writes ``<name>.tex`` and the spec's plots (``.pdf`` + ``.png``) next to the spec, and the same
table as a Markdown page ``docs/results/<name>.md``; ``--all`` also writes ``paper.tex``, which
includes every table and figure. Then every ``<!-- include: PATH -->`` block of the Markdown files
is refreshed (:mod:`kvbench.report.markdown`). ``--run-missing`` first runs the kvbench command of
every missing cell, so a table is rebuilt end to end from nothing.

Modules: :mod:`~kvbench.report.spec` (load and validate a spec), :mod:`~kvbench.report.table` (the
frame -> cells), :mod:`~kvbench.report.latex`, :mod:`~kvbench.report.markdown`,
:mod:`~kvbench.report.plots`; ``python -m kvbench.report`` is :mod:`kvbench.report.__main__`.

A spec (YAML) declares the table::

    caption: ...                     # LaTeX allowed; & % # _ are escaped in labels, not in captions
    label: tab:name
    order: 1                         # position in paper.tex (then by name)
    runs: reports/runs               # results store: a local folder, or wandb:<entity>/<project>
    filters: {model.name: smollm2-135m, eval.seqlen: 512}   # every cell's runs match these;
                                     # a list is a list-valued key; {any: [a, b]} allows several values
    overrides: [logging.wandb.mode=disabled]                # extra args in the commands of missing runs
    metric: metrics.ppl              # default metric of a column
    decimals: 2
    best: min                        # min | max | none: best non-reference value per column in bold
    ignore: [kv.bits]                # config keys whose differences do not make a different experiment
    seeds: [0, 1, 2]                 # optional: seeds each cell should have (mean +- std over them)
    sections: kv.bits                # optional: rows grouped by this key, \\midrule between groups
    rows:
      - {label: fp16, match: {method.name: fp16}, reference: true, ignore: [kv.bits]}
      - {label: "int{kv.bits}", match: {method.name: uniform}, expand: {kv.bits: [4, 3, 2]}}
    columns:
      - {label: Wiki, group: Perplexity, match: {data.name: wiki}, relative: pct}
      - {label: C4, match: {data.name: c4}, optional: true}   # left out when no run has it
      - {label: avg bits, metric: metrics.avg_bits, match: {data.name: wiki}, best: none}
      - {label: Avg., average: true}          # mean of the plain metric columns before it
      - {label: speedup, metric: metrics.decode_speedup.llama3-8b.32k, missing: no GPU record}
                                     # a derived column (kvbench.report.cost); `missing:` the words of an
                                     # empty cell, which is then not a run to compute
    plots:
      - {name: pareto, kind: pareto, x: metrics.avg_bits, y: metrics.ppl, series: [method.name]}
      - {name: drop, kind: drop}             # reference minus each row, per metric column

A cell's runs are the rows of the frame that match ``filters``, the row's and the column's ``match``.
Runs that differ only in ``seed`` are repeats (mean +- std); runs with the same config and seed in
different run directories are duplicates: reported (in the output and the ``.tex`` header) and marked,
the newest one used, never averaged. Runs that differ in any other config key make the cell ambiguous:
it shows ``?`` and the output names the differing keys, so a filter (or ``ignore``) can be added.

Error bars, for a cell of one run: a metric ``m`` with ``m_ci95`` (perplexity: a block bootstrap over
tokens) shows the half-width of that 95 % interval, one with ``m_stderr`` (lm-eval) its standard
error. A ``relative:`` cell whose run and reference run both hold ``m_blocks`` (per-block NLL sums) on
the same tokens shows the *paired* 95 % interval of the change (:func:`kvbench.stats.paired_delta_ci`);
otherwise (older runs, several seeds, other tokens) the plain change with a mark.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from kvbench.errors import UserError
from kvbench.report.cost import add_cost_columns
from kvbench.report.latex import AMBIGUOUS, DAGGER, MISSING, UNPAIRED, compile_pdf, format_cell, render_paper, \
    render_table, tex_escape
from kvbench.report.markdown import refresh_includes, render_page, tex_to_md
from kvbench.report.plots import draw, pareto_front, plot_drop, plot_pareto
from kvbench.report.spec import load_spec, rebuild_command, spec_paths
from kvbench.report.table import Cell, Table, best_rows, build_table, command_for, expand_columns, matches

__all__ = ["AMBIGUOUS", "DAGGER", "MISSING", "UNPAIRED", "Cell", "Table", "best_rows", "build", "build_table",
           "command_for", "compile_pdf", "expand_columns", "format_cell", "load_frame", "load_spec", "main",
           "matches", "pareto_front", "plot_drop", "plot_pareto", "rebuild_command", "refresh_includes",
           "render_page", "render_paper", "render_table", "run_missing", "spec_paths", "tex_escape", "tex_to_md"]


def load_frame(source: str):
    """The results frame of ``source``: a local results folder, or ``wandb:<entity>/<project>``."""
    from kvbench.tracking import store as results

    if str(source).startswith("wandb:"):
        return results.load(wandb=str(source).removeprefix("wandb:"))
    return results.load(source)


def build(spec: dict, frame=None, out: Path | None = None, source: str | None = None,
          pages: Path | None = None) -> dict:
    """Write one spec's ``.tex``, plots and Markdown page.

    Args:
        spec: a loaded spec (:func:`load_spec`).
        frame: the results frame (default: read from ``source``).
        out: the folder of the ``.tex`` and plots (default: the spec's folder).
        source: the results store (default: the spec's ``runs``).
        pages: the folder of the Markdown page (default: ``out``).

    Returns:
        ``{"tex", "page", "plots", "missing", "duplicates", "table"}``.
    """
    source = source or spec["runs"]
    frame = add_cost_columns(load_frame(source) if frame is None else frame)
    out = Path(out or spec["path"].parent)
    pages = Path(pages or out)
    for folder in (out, pages):
        folder.mkdir(parents=True, exist_ok=True)
    table = build_table(frame, spec)
    command = rebuild_command(spec)
    tex, page = out / f"{spec['name']}.tex", pages / f"{spec['name']}.md"
    tex.write_text(render_table(table, command, source))
    page.write_text(render_page(table, command, source, page, out))
    plots = [path for p in spec["plots"] for path in draw(frame, table, p, out)]
    return {"tex": tex, "page": page, "plots": plots, "missing": table.missing, "duplicates": table.duplicates,
            "table": table}


def run_missing(commands: list[str]) -> None:
    """Run the kvbench command of every missing cell, in this process, one after the other.

    Each command's overrides are composed exactly as ``python -m kvbench`` would compose them (one
    interpreter start instead of one per run); a failing run stops with its command line.
    """
    from tqdm.auto import tqdm

    from kvbench.config import compose
    from kvbench.run import run

    for cmd in tqdm(commands, desc="missing runs"):
        overrides = shlex.split(cmd)[3:]  # drop `python -m kvbench`
        try:
            run(compose(overrides))
        except Exception as e:  # noqa: BLE001 - any failure: name the command that failed
            raise UserError(f"this run failed ({type(e).__name__}: {e}): {cmd}") from e


def main(argv: list[str] | None = None) -> int:
    """``python -m kvbench.report`` (:mod:`kvbench.report.__main__`)."""
    from kvbench.report.__main__ import main as cli

    return cli(argv)
