"""A :class:`~kvbench.report.table.Table` as a booktabs LaTeX table; ``paper.tex``; ``pdflatex``.

The LaTeX comes from the Jinja2 templates in ``kvbench/report/templates/`` (delimiters ``<< >>`` and
``<% %>``, so LaTeX keeps its braces).
"""

from __future__ import annotations

import os
import re
import subprocess
from importlib.resources import files
from pathlib import Path

from kvbench.errors import UserError
from kvbench.report.spec import rebuild_command, rel
from kvbench.report.table import Cell, Style, Table, best_rows, column_groups, notes, sections, write_cell

MISSING = r"$\emptyset$"
DAGGER = r"$^\dagger$"
UNPAIRED = r"$^{*}$"
AMBIGUOUS = r"\textbf{?}"
STALE = r"$^\S$"
STYLE = Style(bold=r"\textbf{%s}", spread=r"{\scriptsize$\pm$%s}", interval=r"{\scriptsize\,[%s, %s]}",
              unpaired=UNPAIRED, duplicate=DAGGER, ambiguous=AMBIGUOUS, none="--", missing=MISSING,
              stale=STALE)
NOTES = {
    "seeds": r"mean$\pm$std over seeds",
    "ci": r"$\pm$ on one run: half-width of its 95\,\% interval (block bootstrap over tokens)",
    "stderr": r"$\pm$ on one run: standard error (lm-evaluation-harness)",
    "paired": (r"$\Delta$ [lo, hi]: paired 95\,\% interval of the change (the same token blocks resampled "
               r"for both runs; an interval that contains 0 is not significant)"),
    "unpaired": UNPAIRED + r": no paired interval (a run without per-block NLLs, several seeds, or other tokens)",
    "missing": "{marker}: no run yet (the commands are listed in the header of this file)",
    "ambiguous": AMBIGUOUS + ": runs of several configs match (listed in the header of this file)",
    "duplicate": DAGGER + ": duplicate runs that disagree, the newest shown",
    "stale": STALE + ": a run of an older results version (its code has changed numbers since; rerun to refresh)",
}


def tex_escape(text: str) -> str:
    """Escape the characters that break a table cell (``& % # _``); ``$...$`` math is kept."""
    return re.sub(r"(?<!\\)([&%#_])", r"\\\1", str(text))


def format_cell(cell: Cell, col: dict, bold: bool, marker: str) -> str:
    """One cell's LaTeX (see :func:`kvbench.report.table.shown`), or the marker of a missing run."""
    return write_cell(cell, col, bold, STYLE, marker)


def _env():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(files("kvbench.report") / "templates")),
        block_start_string="<%", block_end_string="%>", variable_start_string="<<", variable_end_string=">>",
        comment_start_string="<#", comment_end_string="#>", trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, undefined=jinja2.StrictUndefined, autoescape=False)


def render_table(table: Table, command: str, source: str) -> str:
    """The table as a booktabs ``table`` environment (template ``templates/table.tex.j2``).

    Args:
        table: the computed table.
        command: the command that rebuilds it (in the header comment and the notes).
        source: the results store it was read from (in the header comment).
    """
    spec, cols = table.spec, table.columns
    best = [best_rows(table, j) for j in range(len(cols))]
    marker = spec["missing_marker"] or MISSING
    body = [[{"label": tex_escape(spec["rows"][i]["label"]),
              "cells": [format_cell(c, cols[j], i in best[j], marker) for j, c in enumerate(table.cells[i])]}
             for i in section] for section in sections(table)]
    lines = [NOTES[k].replace("{marker}", marker) for k in notes(table)]
    lines.append(r"rebuilt by \texttt{" + tex_escape(command) + "}")
    return _env().get_template("table.tex.j2").render(
        command=command, source=source, n_runs=table.n_runs, missing=table.missing, duplicates=table.duplicates,
        ambiguous=table.ambiguous,
        caption=spec["caption"], label=spec["label"], colspec="r" * len(cols), groups=column_groups(cols),
        row_header=tex_escape(spec["row_header"]), headers=[tex_escape(c["label"]) for c in cols],
        sections=body, notes=lines)


def render_paper(specs: list[dict], folder: Path, command: str, title: str = "kvbench report") -> str:
    """``paper.tex``: every table and figure of ``specs`` (template ``templates/paper.tex.j2``)."""
    items = []
    for s in sorted(specs, key=lambda s: (s["order"], s["name"])):
        cmd = rebuild_command(s)
        items.append({"kind": "table", "file": s["name"], "command": cmd})
        for p in s["plots"]:
            caption = p["caption"] or p["name"]
            items.append({"kind": "figure", "file": p["name"] + ".pdf", "width": p["width"], "label": p["label"],
                          "caption": caption + r" Rebuilt by \texttt{" + tex_escape(cmd) + "}."})
    return _env().get_template("paper.tex.j2").render(command=command, folder=rel(folder), title=title, items=items)


def compile_pdf(tex: Path) -> Path:
    """``pdflatex`` a document twice (for references) in its folder; keeps only the PDF."""
    import shutil

    if not shutil.which("pdflatex"):
        raise UserError("pdflatex is not installed (Debian: apt-get install texlive-latex-base texlive-latex-recommended)")
    for _ in range(2):
        env = {**os.environ, "SOURCE_DATE_EPOCH": "0", "FORCE_SOURCE_DATE": "1"}  # reproducible PDF bytes
        r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name], cwd=tex.parent,
                           capture_output=True, text=True, env=env)
        if r.returncode:
            err = [line for line in r.stdout.splitlines() if line.startswith("!")]
            raise UserError(f"pdflatex failed on {tex}: {err[0] if err else r.stdout[-500:]}")
    for ext in (".aux", ".log", ".out"):
        tex.with_suffix(ext).unlink(missing_ok=True)
    return tex.with_suffix(".pdf")
