"""Paper tables (booktabs LaTeX) and plots, rebuilt from the results store by one command.

``python -m kvbench.report reports/<spec>.yaml`` (or ``--all`` for every ``reports/*.yaml``) reads the
results frame (:func:`kvbench.results.load`: one row per run, dotted config columns + ``metrics.*``)
and writes ``<name>.tex`` and the spec's plots (``.pdf`` + ``.png``) next to the spec; ``--all`` also
writes ``paper.tex``, which includes every table and figure. ``--run-missing`` first runs the
kvbench command of every missing cell, so a table is rebuilt end to end from nothing.

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

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.resources import files
from itertools import product
from pathlib import Path

from kvbench.errors import UserError

SPEC_KEYS = {"name", "caption", "label", "runs", "filters", "overrides", "metric", "decimals", "best",
             "ignore", "seeds", "sections", "rows", "columns", "plots", "missing_marker", "row_header", "order"}
ROW_KEYS = {"label", "match", "expand", "reference", "ignore"}
COLUMN_KEYS = {"label", "group", "match", "metric", "decimals", "best", "format", "relative", "average", "ignore",
               "optional"}
PLOT_KEYS = {"name", "kind", "x", "y", "series", "match", "caption", "label", "logy", "width", "xlabel", "ylabel"}
# Config columns that never tell two experiments apart.
BOOKKEEPING = ("run_dir", "run_id", "seed", "output_dir", "command", "source", "experiment")
BOOKKEEPING_PREFIXES = ("logging.", "metrics.", "wandb.")
HYDRA_GROUPS = ("method", "model", "data", "eval", "kv", "calib", "logging")  # `<group>.name: x` -> `<group>=x`
MISSING = r"$\emptyset$"
DAGGER = r"$^\dagger$"
UNPAIRED = r"$^{*}$"
AMBIGUOUS = r"\textbf{?}"
DUP_TOL = 1e-9


# ----------------------------------------------------------------------------------------- spec


def _check_keys(d: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(allowed)}")


def load_spec(path: str | Path) -> dict:
    """Read and validate a table spec; rows are expanded, defaults filled in.

    Returns:
        The spec dict with ``rows``/``columns``/``plots`` as lists of normalised dicts and
        ``path``/``name`` set.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such report spec: {path}")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: a report spec is a mapping with rows and columns")
    _check_keys(spec, SPEC_KEYS, str(path))
    for key in ("rows", "columns"):
        if not spec.get(key):
            raise UserError(f"{path}: `{key}` is required (a list)")
    spec = {"name": path.stem, "caption": path.stem, "label": f"tab:{path.stem}", "runs": "reports/runs",
            "filters": {}, "overrides": [], "metric": "metrics.ppl", "decimals": 2, "best": "min",
            "ignore": [], "seeds": None, "sections": None, "plots": [], "missing_marker": MISSING,
            "row_header": "Method", "order": 100, **spec, "path": path}
    rows = []
    for i, r in enumerate(spec["rows"]):
        _check_keys(r, ROW_KEYS, f"{path}: rows[{i}]")
        rows.extend(_expand_row(r))
    if spec["sections"]:
        order = []
        for r in rows:
            v = r["match"].get(spec["sections"])
            if v not in order:
                order.append(v)
        rows.sort(key=lambda r: (not r["reference"], order.index(r["match"].get(spec["sections"]))))
    spec["rows"] = rows
    cols = []
    for i, c in enumerate(spec["columns"]):
        _check_keys(c, COLUMN_KEYS, f"{path}: columns[{i}]")
        if c.get("best", spec["best"]) not in ("min", "max", "none"):
            raise UserError(f"{path}: columns[{i}].best must be min, max or none")
        if c.get("relative") not in (None, "diff", "pct"):
            raise UserError(f"{path}: columns[{i}].relative must be diff or pct")
        cols.append({"label": str(c.get("label", f"col{i}")), "group": c.get("group"), "match": c.get("match") or {},
                     "metric": c.get("metric", spec["metric"]), "decimals": c.get("decimals", spec["decimals"]),
                     "best": c.get("best", spec["best"]), "format": c.get("format"),
                     "relative": c.get("relative"), "average": c.get("average"), "ignore": c.get("ignore") or [],
                     "optional": bool(c.get("optional"))})
    spec["columns"] = cols
    plots = []
    for i, p in enumerate(spec["plots"]):
        _check_keys(p, PLOT_KEYS, f"{path}: plots[{i}]")
        if p.get("kind") not in ("pareto", "drop"):
            raise UserError(f"{path}: plots[{i}].kind must be pareto or drop")
        plots.append({"name": f"{spec['name']}_{p['kind']}", "caption": "", "label": None, "logy": False,
                      "width": 0.7, "series": ["method.name"], "match": {}, "x": "metrics.avg_bits",
                      "y": spec["metric"], **p})
        plots[-1]["label"] = plots[-1]["label"] or f"fig:{plots[-1]['name']}"
    spec["plots"] = plots
    return spec


def _expand_row(r: dict) -> list[dict]:
    """A row with ``expand: {key: [v1, v2]}`` becomes one row per value combination."""
    match = dict(r.get("match") or {})
    keys = list((r.get("expand") or {}).keys())
    combos = product(*[r["expand"][k] for k in keys]) if keys else [()]
    out = []
    for combo in combos:
        m = {**match, **dict(zip(keys, combo))}
        label = re.sub(r"\{([\w.]+)\}", lambda g: str(m[g.group(1)]) if g.group(1) in m else g.group(0),
                       str(r.get("label", "")))
        out.append({"label": label, "match": m, "reference": bool(r.get("reference")), "ignore": r.get("ignore") or []})
    return out


def spec_paths(folder: str | Path) -> list[Path]:
    """Every table spec of a reports folder (top-level ``*.yaml``, sorted)."""
    paths = sorted(Path(folder).glob("*.yaml"))
    if not paths:
        raise UserError(f"no report specs (*.yaml) in {folder}")
    return paths


# ----------------------------------------------------------------------------------------- table


@dataclass
class Cell:
    """The runs behind one table cell: one value per seed (duplicates resolved to the newest run)."""

    values: list[float] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    duplicate: bool = False
    selector: dict = field(default_factory=dict)
    ambiguous: str = ""  # why several configs match (the cell then has no value)
    ci: tuple[float, float] | None = None  # one run's 95 % interval; a relative cell's paired interval
    stderr: float | None = None  # one run's standard error (lm-eval)
    blocks: dict | None = None  # one run's per-block NLL sums {"nll", "tokens", "ids"}

    @property
    def missing(self) -> bool:
        return not self.values and not self.ambiguous

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        n = len(self.values)
        if n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (n - 1))


@dataclass
class Table:
    """A computed table: ``cells[i][j]`` for row i and (expanded) column j, plus what was wrong."""

    spec: dict
    columns: list[dict]
    cells: list[list[Cell]]
    n_runs: int
    missing: list[str]
    duplicates: list[str]
    ambiguous: list[str] = field(default_factory=list)


def _matches(frame, selector: dict):
    """Boolean mask of the frame's rows whose config equals ``selector``.

    A value is compared exactly (lists too: list-valued config keys); ``{any: [a, b]}`` allows several.
    """
    import numpy as np
    import pandas as pd

    mask = pd.Series(True, index=frame.index)
    for key, want in selector.items():
        if key not in frame.columns:
            return pd.Series(False, index=frame.index)
        col = frame[key]
        options = want["any"] if _is_any(want) else [want]
        hit = pd.Series(False, index=frame.index)
        for w in options:
            if w is None:
                hit |= col.isna()
            elif isinstance(w, list):
                hit |= col == json.dumps(w)
            elif isinstance(w, bool) or isinstance(w, str):
                hit |= col.astype(object) == w
            else:
                num = pd.to_numeric(col, errors="coerce")
                hit |= pd.Series(np.isclose(num.astype(float), float(w), rtol=1e-9, atol=0), index=frame.index)
        mask &= hit
    return mask


def _identity_columns(frame, ignore: list[str]) -> list[str]:
    return [c for c in frame.columns if c not in BOOKKEEPING and not c.startswith(BOOKKEEPING_PREFIXES)
            and c not in ignore]


def _varying(frame, columns: list[str]) -> list[str]:
    """Columns with more than one distinct value; a missing value (a key older runs lack) matches any."""
    return [c for c in columns if frame[c].dropna().map(lambda v: repr(_norm(v))).nunique() > 1]


def _norm(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _is_any(value) -> bool:
    return isinstance(value, dict) and set(value) == {"any"} and isinstance(value["any"], list)


def command_for(selector: dict, spec: dict, seed=None) -> str:
    """The kvbench command line that produces the run a cell selects (Hydra overrides, shell-quoted)."""
    groups, rest = [], []
    for key, value in selector.items():
        if _is_any(value):
            value = value["any"][0]  # a filter with several allowed values: the first one
        if isinstance(value, list):
            text = "[" + ",".join(str(v) for v in value) + "]"
        elif value is None:
            text = "null"
        elif isinstance(value, bool):
            text = str(value).lower()
        else:
            text = str(value)
        grp, _, sub = key.partition(".")
        if sub == "name" and grp in HYDRA_GROUPS:
            groups.append(f"{grp}={text}")
        else:
            rest.append(f"{key}={text}")
    if seed is not None:
        rest.append(f"seed={seed}")
    groups.sort(key=lambda a: HYDRA_GROUPS.index(a.split("=")[0]))
    args = groups + rest + [f"output_dir={spec['runs']}"] + list(spec["overrides"])
    return "python -m kvbench " + " ".join(shlex.quote(a) for a in args)


def _cell(frame, selector: dict, metric: str, ignore: list[str], spec: dict, where: str,
          duplicates: list[str]) -> Cell:
    cell = Cell(selector=selector)
    if frame.empty:
        return cell
    sub = frame[_matches(frame, selector)]
    if metric not in frame.columns:
        sub = sub.iloc[0:0]
    sub = sub[sub[metric].notna()] if len(sub) else sub
    if sub.empty:
        return cell
    varying = _varying(sub, _identity_columns(sub, ignore))
    if varying:
        cell.ambiguous = (f"cell {where} matches runs of different configs (they differ in {varying}); add these "
                          f"keys to the row's `match` or to `filters` (or to `ignore` if they do not change results)")
        return cell
    sub = sub.assign(_seed=sub["seed"] if "seed" in sub.columns else 0)
    for seed, runs in sub.groupby("_seed", sort=True):
        runs = runs.drop(columns="_seed")
        if len(runs) > 1:  # same config and seed in several run directories: report, never average
            vals = runs[metric].astype(float).tolist()
            same = not _varying(runs, _identity_columns(runs, []))
            agree = max(vals) - min(vals) <= DUP_TOL * max(1.0, abs(max(vals)))
            if same or not agree:
                cell.duplicate |= not agree
                what = ("duplicate runs" if same else "runs differing only in ignored keys") + (
                    "" if agree else ", values DISAGREE")
                duplicates.append(f"{where} seed={seed}: {what}: " + ", ".join(
                    f"{d} ({metric}={v:.6g})" for d, v in zip(runs["run_dir"], vals)))
        newest = runs.iloc[_newest(runs)]
        cell.values.append(float(newest[metric]))
        cell.runs.append(str(newest.get("run_dir", "")))
        if len(cell.values) == 1:
            cell.ci, cell.stderr, cell.blocks = _errors(newest, metric)
        else:  # several seeds: the spread over seeds is the error bar
            cell.ci = cell.stderr = cell.blocks = None
    return cell


def _errors(row, metric: str) -> tuple[tuple[float, float] | None, float | None, dict | None]:
    """A run's ``<metric>_ci95``, ``<metric>_stderr`` and ``<metric>_blocks.*`` (each None if absent)."""
    ci, blocks = _json_value(row.get(metric + "_ci95")), None
    stderr = _norm(row.get(metric + "_stderr"))
    nll, tokens = _json_value(row.get(metric + "_blocks.nll")), _json_value(row.get(metric + "_blocks.tokens"))
    if nll and tokens and len(nll) == len(tokens):
        blocks = {"nll": nll, "tokens": tokens, "ids": _norm(row.get(metric + "_blocks.ids"))}
    return (tuple(ci) if ci else None), (None if stderr is None else float(stderr)), blocks


def _json_value(v):
    """A list-valued metric: a JSON string in a frame from the store, a list in one built by hand."""
    v = _norm(v)
    return json.loads(v) if isinstance(v, str) else v


def _newest(runs) -> int:
    """Position of the most recently finished run (by metrics.json time; last row if unknown)."""
    times = []
    for d in runs.get("run_dir", [None] * len(runs)):
        try:
            times.append((Path(d) / "metrics.json").stat().st_mtime)
        except (OSError, TypeError):
            times.append(-1.0)
    best = max(range(len(times)), key=lambda i: (times[i], i))
    return best


def expand_columns(spec: dict) -> list[dict]:
    """The spec's columns plus one derived column after each ``relative:`` column."""
    out = []
    for i, c in enumerate(spec["columns"]):
        kind = "average" if c["average"] else "metric"
        out.append({**c, "kind": kind, "source": i})
        if c["relative"]:
            label = r"$\Delta$\%" if c["relative"] == "pct" else r"$\Delta$"
            out.append({**c, "label": label, "kind": "relative", "source": i, "best": "none", "format": None,
                        "decimals": 1 if c["relative"] == "pct" else c["decimals"]})
    return out


def build_table(frame, spec: dict) -> Table:
    """Compute every cell of a spec's table from the results frame.

    An ``optional`` column (a dataset that may not be available) is left out when no run has it.
    """
    spec = {**spec, "columns": [c for c in spec["columns"] if not c["optional"] or _has_runs(frame, spec, c)]}
    columns = expand_columns(spec)
    rows = spec["rows"]
    missing, duplicates = [], []
    if not frame.empty:
        for key in spec["filters"]:  # (row/column keys may belong to methods that have no run yet)
            if key not in frame.columns:
                print(f"kvbench.report: warning: {spec['path']}: no run has config key {key!r}", file=sys.stderr)
    base: dict[tuple[int, int], Cell] = {}
    for i, r in enumerate(rows):
        for j, c in enumerate(spec["columns"]):
            if c["average"]:
                continue
            sel = {**spec["filters"], **r["match"], **c["match"]}
            ignore = list(spec["ignore"]) + r["ignore"] + c["ignore"]
            where = f"({r['label']}, {c['label']})"
            base[i, j] = cell = _cell(frame, sel, c["metric"], ignore, spec, where, duplicates)
            wanted = spec["seeds"] or ([None] if cell.missing else [])
            have = set()
            if spec["seeds"] and not frame.empty and cell.runs:
                have = {_norm(s) for s in frame.set_index("run_dir").loc[cell.runs, "seed"]}
            for s in wanted:
                if s not in have:
                    cmd = command_for(sel, spec, s)
                    if cmd not in missing:
                        missing.append(cmd)
    ref = next((i for i, r in enumerate(rows) if r["reference"]), None)
    cells = []
    for i in range(len(rows)):
        line = []
        for c in columns:
            j = c["source"]
            if c["kind"] == "metric":
                line.append(base[i, j])
            elif c["kind"] == "relative":
                line.append(_relative(base[i, j], base.get((ref, j)) if ref is not None else None, c["relative"],
                                      i == ref))
            else:
                line.append(_average(spec, i, j, base))
        cells.append(line)
    n_runs = len({r for line in cells for cell in line for r in cell.runs})
    ambiguous = [c.ambiguous for c in base.values() if c.ambiguous]
    return Table(spec, columns, cells, n_runs, missing, duplicates, ambiguous)


def _has_runs(frame, spec: dict, col: dict) -> bool:
    if frame.empty or col["metric"] not in frame.columns:
        return False
    return bool((_matches(frame, {**spec["filters"], **col["match"]}) & frame[col["metric"]].notna()).any())


def _relative(cell: Cell, ref: Cell | None, mode: str, is_ref: bool) -> Cell:
    """Change of ``cell`` against ``ref`` (% or difference), with the paired interval when both runs hold
    per-block NLLs of the same tokens."""
    if is_ref or ref is None or not cell.values or not ref.values:
        return Cell()
    d = cell.mean - ref.mean
    out = Cell(values=[d / ref.mean * 100 if mode == "pct" else d])
    a, b = ref.blocks, cell.blocks
    same_ids = a and b and (a["ids"] is None or b["ids"] is None or a["ids"] == b["ids"])
    if same_ids and len(a["tokens"]) > 1 and a["tokens"] == b["tokens"]:
        from kvbench import stats

        out.ci = stats.paired_delta_ci(a["nll"], b["nll"], a["tokens"], mode=mode)
    return out


def _average(spec: dict, i: int, j: int, base: dict) -> Cell:
    want = spec["columns"][j]["average"]
    picked = [k for k in range(j) if not spec["columns"][k]["average"] and spec["columns"][k]["best"] != "none"
              and (want is True or spec["columns"][k]["label"] in want)]
    if not picked or any(not base[i, k].values for k in picked):
        return Cell()
    return Cell(values=[sum(base[i, k].mean for k in picked) / len(picked)])


# ----------------------------------------------------------------------------------------- LaTeX


def tex_escape(text: str) -> str:
    """Escape the characters that break a table cell (``& % # _``); ``$...$`` math is kept."""
    return re.sub(r"(?<!\\)([&%#_])", r"\\\1", str(text))


def format_cell(cell: Cell, col: dict, bold: bool, marker: str) -> str:
    """One cell's LaTeX, or the marker.

    A metric cell: mean (bold if best), then +- the std over seeds, or for one run +- the half-width
    of its 95 % interval or its standard error; a dagger for disagreeing duplicates. A relative cell:
    the signed change and its paired 95 % interval ``[lo, hi]``, or the ``UNPAIRED`` mark.
    """
    if cell.ambiguous:
        return AMBIGUOUS
    if not cell.values:
        return "--" if col["kind"] == "relative" else marker
    scale = 100.0 if col["format"] == "pct" else 1.0
    d = col["decimals"]
    sign = "+" if col["kind"] == "relative" else ""
    text = f"{cell.mean * scale:{sign}.{d}f}"
    if bold:
        text = rf"\textbf{{{text}}}"
    spread = _spread(cell, col)
    if spread is not None:
        text += rf"{{\scriptsize$\pm${spread * scale:.{d}f}}}"
    if col["kind"] == "relative":
        if cell.ci:
            text += rf"{{\scriptsize\,[{cell.ci[0] * scale:+.{d}f}, {cell.ci[1] * scale:+.{d}f}]}}"
        else:
            text += UNPAIRED
    if cell.duplicate:
        text += DAGGER
    return text


def _spread(cell: Cell, col: dict) -> float | None:
    """The +- of a metric cell: std over seeds, else half the 95 % interval, else the standard error."""
    if col["kind"] == "relative":
        return None
    if len(cell.values) > 1:
        return cell.std if cell.std > 0 else None
    if cell.ci:
        return (cell.ci[1] - cell.ci[0]) / 2
    return cell.stderr


def _best_rows(table: Table, j: int) -> set[int]:
    col = table.columns[j]
    if col["best"] == "none" or col["kind"] == "relative":
        return set()
    vals = {i: line[j].mean for i, line in enumerate(table.cells)
            if not table.spec["rows"][i]["reference"] and line[j].values}
    if len(vals) < 2:
        return set()
    target = min(vals.values()) if col["best"] == "min" else max(vals.values())
    d = col["decimals"] + (2 if col["format"] == "pct" else 0)
    return {i for i, v in vals.items() if round(v, d) == round(target, d)}


def _env():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(files("kvbench") / "templates")),
        block_start_string="<%", block_end_string="%>", variable_start_string="<<", variable_end_string=">>",
        comment_start_string="<#", comment_end_string="#>", trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, undefined=jinja2.StrictUndefined, autoescape=False)


def render_table(table: Table, command: str, source: str) -> str:
    """The table as a booktabs ``table`` environment (template ``kvbench/templates/table.tex.j2``)."""
    spec, cols = table.spec, table.columns
    best = [_best_rows(table, j) for j in range(len(cols))]
    marker = spec["missing_marker"]
    body, section_key, prev = [], spec["sections"], object()
    for i, row in enumerate(spec["rows"]):
        key = "__ref__" if row["reference"] else row["match"].get(section_key) if section_key else None
        if not body or (section_key and key != prev) or (not section_key and row["reference"] != spec["rows"][i - 1]["reference"]):
            body.append([])
        prev = key
        body[-1].append({"label": tex_escape(row["label"]),
                         "cells": [format_cell(c, cols[j], i in best[j], marker) for j, c in enumerate(table.cells[i])]})
    groups = []
    if any(c["group"] for c in cols):
        for j, c in enumerate(cols):
            if groups and groups[-1]["label"] == c["group"]:
                groups[-1]["span"] += 1
                groups[-1]["last"] = j + 2
            else:
                groups.append({"label": c["group"], "span": 1, "first": j + 2, "last": j + 2})
    flat = [c for line in table.cells for c in line]
    shown = [(c, cols[j]) for line in table.cells for j, c in enumerate(line) if c.values and not c.ambiguous]
    metric = [c for c, col in shown if col["kind"] != "relative" and _spread(c, col) is not None]
    relative = [c for c, col in shown if col["kind"] == "relative"]
    notes = []
    if any(len(c.values) > 1 for c in flat):
        notes.append(r"mean$\pm$std over seeds")
    if any(len(c.values) == 1 and c.ci for c in metric):
        notes.append(r"$\pm$ on one run: half-width of its 95\,\% interval (block bootstrap over tokens)")
    if any(len(c.values) == 1 and not c.ci for c in metric):
        notes.append(r"$\pm$ on one run: standard error (lm-evaluation-harness)")
    if any(c.ci for c in relative):
        notes.append(r"$\Delta$ [lo, hi]: paired 95\,\% interval of the change (the same token blocks resampled "
                     r"for both runs; an interval that contains 0 is not significant)")
    if any(not c.ci for c in relative):
        notes.append(UNPAIRED + r": no paired interval (a run without per-block NLLs, several seeds, or other tokens)")
    if any(c.missing for line in table.cells for j, c in enumerate(line) if table.columns[j]["kind"] != "relative"):
        notes.append(f"{marker}: no run yet (the commands are listed in the header of this file)")
    if any(c.ambiguous for c in flat):
        notes.append(f"{AMBIGUOUS}: runs of several configs match (listed in the header of this file)")
    if any(c.duplicate for c in flat):
        notes.append(f"{DAGGER}: duplicate runs that disagree, the newest shown")
    notes.append(r"rebuilt by \texttt{" + tex_escape(command) + "}")
    return _env().get_template("table.tex.j2").render(
        command=command, source=source, n_runs=table.n_runs, missing=table.missing, duplicates=table.duplicates,
        ambiguous=table.ambiguous,
        caption=spec["caption"], label=spec["label"], colspec="r" * len(cols), groups=groups,
        row_header=tex_escape(spec["row_header"]), headers=[tex_escape(c["label"]) for c in cols],
        sections=body, notes=notes)


def render_paper(specs: list[dict], folder: Path, command: str, title: str = "kvbench report") -> str:
    """``paper.tex``: every table and figure of ``specs`` (template ``kvbench/templates/paper.tex.j2``)."""
    items = []
    for s in sorted(specs, key=lambda s: (s["order"], s["name"])):
        cmd = _rebuild(s)
        items.append({"kind": "table", "file": s["name"], "command": cmd})
        for p in s["plots"]:
            caption = p["caption"] or p["name"]
            items.append({"kind": "figure", "file": p["name"] + ".pdf", "width": p["width"], "label": p["label"],
                          "caption": caption + r" Rebuilt by \texttt{" + tex_escape(cmd) + "}."})
    return _env().get_template("paper.tex.j2").render(command=command, folder=_rel(folder), title=title, items=items)


def _rel(path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------- plots


def _series_label(row, series: list[str]) -> str:
    return " ".join(str(_norm(row.get(k))) for k in series if _norm(row.get(k)) is not None)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (fewer bits and lower y), sorted by x."""
    front, best = [], math.inf
    for px, py in sorted(points):
        if py < best:
            front.append((px, py))
            best = py
    return front


def plot_pareto(frame, spec: dict, plot: dict, out: Path) -> list[Path]:
    """``y`` against ``x`` for every matching run (seeds averaged), with the Pareto front of each series.

    Points at ``x >= 16`` (unquantized) are drawn as horizontal reference lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sub = frame[_matches(frame, {**spec["filters"], **plot["match"]})] if not frame.empty else frame
    x, y = plot["x"], plot["y"]
    if not sub.empty and x in sub.columns and y in sub.columns:
        sub = sub[sub[x].notna() & sub[y].notna()]
        ident = [c for c in _identity_columns(sub, []) if c in sub.columns]
        key = [repr(tuple(_norm(v) for v in r)) for r in sub[ident].itertuples(index=False)]
        pts = sub.assign(_k=key).groupby("_k").agg(
            {x: "mean", y: "mean", **{k: "first" for k in plot["series"] if k in sub.columns}})
        labels = pts.apply(lambda r: _series_label(r, plot["series"]), axis=1) if len(pts) else []
        for i, (name, g) in enumerate(pts.groupby(list(labels), sort=True)):
            color = f"C{i % 10}"
            ref = g[g[x] >= 16]
            if len(ref):
                ax.axhline(ref[y].mean(), color=color, ls="--", lw=1, label=f"{name} (16 bits)")
            g = g[g[x] < 16].sort_values([x, y])
            if g.empty:
                continue
            ax.scatter(g[x], g[y], color=color, s=14, alpha=0.45)
            front = pareto_front(list(zip(g[x], g[y])))
            ax.plot(*zip(*front), color=color, marker="o", ms=4, label=f"{name} (Pareto front)")
    else:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)
    if plot["logy"]:
        from matplotlib.ticker import FormatStrFormatter, NullFormatter

        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 20, not 2 x 10^1
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if hi / lo < 10 else NullFormatter())
    ax.set_xlabel(plot.get("xlabel") or "average bits per K/V element")
    ax.set_ylabel(plot.get("ylabel") or y.removeprefix("metrics."))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _save(fig, out / plot["name"], _rebuild(spec))


def plot_drop(table: Table, plot: dict, out: Path) -> list[Path]:
    """How much worse than the reference row each row is, per metric column (accuracy drop per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = table.spec
    cols = [j for j, c in enumerate(table.columns) if c["kind"] == "metric" and c["best"] != "none"]
    ref = next((i for i, r in enumerate(spec["rows"]) if r["reference"]), None)
    rows = [i for i, r in enumerate(spec["rows"]) if not r["reference"]]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(cols) + 2), 3.6))
    width = 0.8 / max(1, len(rows))
    drawn = False
    for n, i in enumerate(rows):
        xs, hs = [], []
        for k, j in enumerate(cols):
            a, b = table.cells[ref][j] if ref is not None else None, table.cells[i][j]
            if a is None or not a.values or not b.values:
                continue
            scale = 100.0 if table.columns[j]["format"] == "pct" else 1.0
            sign = 1.0 if table.columns[j]["best"] == "max" else -1.0  # a drop in accuracy, a rise in ppl
            xs.append(k + (n - (len(rows) - 1) / 2) * width)
            hs.append(sign * (a.mean - b.mean) * scale)
        if xs:
            ax.bar(xs, hs, width=width, label=spec["rows"][i]["label"], color=f"C{n % 10}")
            drawn = True
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(cols)), [table.columns[j]["label"] for j in cols], rotation=30, ha="right")
    worse = "drop" if any(table.columns[j]["best"] == "max" for j in cols) else "increase"
    ax.set_ylabel(plot.get("ylabel") or f"{worse} vs {spec['rows'][ref]['label'] if ref is not None else 'reference'}")
    ax.grid(axis="y", alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out / plot["name"], _rebuild(spec))


def _rebuild(spec: dict) -> str:
    return f"python -m kvbench.report {_rel(spec['path'])}"


def _save(fig, stem: Path, command: str) -> list[Path]:
    """PDF + PNG with reproducible bytes; the command that rebuilds them is in their metadata."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    paths = [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    fig.savefig(paths[0], metadata={"CreationDate": None, "Producer": None, "Subject": command})
    fig.savefig(paths[1], dpi=150, metadata={"Software": None, "Description": command})
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------- driver


def load_frame(source: str):
    """The results frame of ``source``: a local results folder, or ``wandb:<entity>/<project>``."""
    from kvbench import results

    if str(source).startswith("wandb:"):
        return results.load(wandb=str(source).removeprefix("wandb:"))
    return results.load(source)


def build(spec: dict, frame=None, out: Path | None = None, source: str | None = None) -> dict:
    """Write one spec's ``.tex`` and plots; returns ``{"tex", "plots", "missing", "duplicates"}``."""
    source = source or spec["runs"]
    frame = load_frame(source) if frame is None else frame
    out = Path(out or spec["path"].parent)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(frame, spec)
    command = _rebuild(spec)
    tex = out / f"{spec['name']}.tex"
    tex.write_text(render_table(table, command, source))
    plots = []
    for p in spec["plots"]:
        plots += plot_pareto(frame, spec, p, out) if p["kind"] == "pareto" else plot_drop(table, p, out)
    return {"tex": tex, "plots": plots, "missing": table.missing, "duplicates": table.duplicates, "table": table}


def run_missing(commands: list[str]) -> None:
    """Run the kvbench command of every missing cell, in this process, one after the other.

    Each command's overrides are composed exactly as ``python -m kvbench`` would compose them (one
    interpreter start instead of one per run); a failing run stops with its command line.
    """
    from hydra import compose, initialize_config_dir
    from tqdm.auto import tqdm

    from kvbench.__main__ import conf_dir
    from kvbench.config import register_configs
    from kvbench.run import run

    register_configs()
    for cmd in tqdm(commands, desc="missing runs"):
        overrides = shlex.split(cmd)[3:]  # drop `python -m kvbench`
        try:
            with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
                cfg = compose("config", overrides=overrides)
            run(cfg)
        except Exception as e:  # noqa: BLE001 - any failure: name the command that failed
            raise UserError(f"this run failed ({type(e).__name__}: {e}): {cmd}") from e


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvbench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="*", help="table specs (reports/<name>.yaml)")
    p.add_argument("--all", nargs="?", const="reports", metavar="FOLDER",
                   help="every *.yaml in FOLDER (default reports/), and FOLDER/paper.tex")
    p.add_argument("--runs", help="results store to read instead of each spec's `runs` (a folder or wandb:ENTITY/PROJECT)")
    p.add_argument("--out", help="output folder (default: the spec's folder)")
    p.add_argument("--run-missing", action="store_true", help="run the missing runs first, then report")
    p.add_argument("--pdf", action="store_true", help="with --all: also compile paper.tex with pdflatex")
    a = p.parse_args(argv)
    try:
        paths = [Path(s) for s in a.specs] + (spec_paths(a.all) if a.all else [])
        if not paths:
            p.error("give a spec (reports/<name>.yaml) or --all")
        specs = [load_spec(s) for s in paths]
        frames = {}
        for spec in specs:
            source = a.runs or spec["runs"]
            if a.run_missing:
                todo = build_table(frames.get(source) if source in frames else load_frame(source), spec).missing
                if todo:
                    run_missing(todo)
                    frames.pop(source, None)
            if source not in frames:
                frames[source] = load_frame(source)
            res = build(spec, frames[source], a.out, source)
            print(f"kvbench.report | {res['tex']} from {res['table'].n_runs} runs in {source}"
                  + "".join(f", {q}" for q in res["plots"]))
            if res["missing"]:
                print(f"  missing runs ({len(res['missing'])}), each produced by:")
                for cmd in res["missing"]:
                    print(f"    {cmd}")
            for d in res["duplicates"]:
                print(f"  duplicate: {d}")
            for d in res["table"].ambiguous:
                print(f"  ambiguous: {d}")
        if a.all:
            folder = Path(a.out or a.all)
            paper = folder / "paper.tex"
            paper.write_text(render_paper(specs, folder, "python -m kvbench.report --all"))
            print(f"kvbench.report | {paper} (build: cd {folder} && pdflatex paper.tex)")
            if a.pdf:
                print(f"kvbench.report | {compile_pdf(paper)}")
    except UserError as e:
        print(f"kvbench.report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
