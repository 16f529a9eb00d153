"""The results frame -> a :class:`Table` of :class:`Cell` s, and what each cell shows in any output format.

Matching runs to cells, repeats over seeds, duplicates, ambiguous cells, ``relative:`` columns with
their paired intervals, ``average:`` columns and the best value per column are decided here, once;
:mod:`kvbench.report.latex` and :mod:`kvbench.report.markdown` only write them down.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kvbench.tracking.store import RESULTS_VERSION

# Config columns that never tell two experiments apart.
BOOKKEEPING = ("run_dir", "run_id", "results_version", "seed", "output_dir", "command", "source", "experiment")
BOOKKEEPING_PREFIXES = ("logging.", "metrics.", "wandb.")
HYDRA_GROUPS = ("method", "model", "data", "eval", "kv", "calib", "logging")  # `<group>.name: x` -> `<group>=x`
DUP_TOL = 1e-9


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
    stale: bool = False  # a run of an older results version (computed by code whose numbers have changed since)

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


def matches(frame, selector: dict):
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


def identity_columns(frame, ignore: list[str]) -> list[str]:
    return [c for c in frame.columns if c not in BOOKKEEPING and not c.startswith(BOOKKEEPING_PREFIXES)
            and c not in ignore]


def _varying(frame, columns: list[str]) -> list[str]:
    """Columns with more than one distinct value; a missing value (a key older runs lack) matches any."""
    return [c for c in columns if frame[c].dropna().map(lambda v: repr(norm(v))).nunique() > 1]


def norm(v):
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
    sub = frame[matches(frame, selector)]
    if metric not in frame.columns:
        sub = sub.iloc[0:0]
    sub = sub[sub[metric].notna()] if len(sub) else sub
    if sub.empty:
        return cell
    varying = _varying(sub, identity_columns(sub, ignore))
    if varying:
        cell.ambiguous = (f"cell {where} matches runs of different configs (they differ in {varying}); add these "
                          f"keys to the row's `match` or to `filters` (or to `ignore` if they do not change results)")
        return cell
    sub = sub.assign(_seed=sub["seed"] if "seed" in sub.columns else 0)
    for seed, runs in sub.groupby("_seed", sort=True):
        runs = runs.drop(columns="_seed")
        if len(runs) > 1:  # same config and seed in several run directories: report, never average
            vals = runs[metric].astype(float).tolist()
            same = not _varying(runs, identity_columns(runs, []))
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
        version = newest.get("results_version")
        cell.stale |= version is not None and version == version and int(version) < RESULTS_VERSION  # NaN: no record
        if len(cell.values) == 1:
            cell.ci, cell.stderr, cell.blocks = _errors(newest, metric)
        else:  # several seeds: the spread over seeds is the error bar
            cell.ci = cell.stderr = cell.blocks = None
    return cell


def _errors(row, metric: str) -> tuple[tuple[float, float] | None, float | None, dict | None]:
    """A run's ``<metric>_ci95``, ``<metric>_stderr`` and ``<metric>_blocks.*`` (each None if absent)."""
    ci, blocks = _json_value(row.get(metric + "_ci95")), None
    stderr = norm(row.get(metric + "_stderr"))
    nll, tokens = _json_value(row.get(metric + "_blocks.nll")), _json_value(row.get(metric + "_blocks.tokens"))
    if nll and tokens and len(nll) == len(tokens):
        blocks = {"nll": nll, "tokens": tokens, "ids": norm(row.get(metric + "_blocks.ids"))}
    return (tuple(ci) if ci else None), (None if stderr is None else float(stderr)), blocks


def _json_value(v):
    """A list-valued metric: a JSON string in a frame from the store, a list in one built by hand."""
    v = norm(v)
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
            out.append({**c, "label": label, "kind": "relative", "source": i, "best": "none",
                        "format": c["format"] if c["relative"] == "diff" else None,  # a diff of % is in points
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
            wanted = spec["seeds"] or ([None] if cell.missing and not c["missing"] else [])  # own text: not a run
            have = set()
            if spec["seeds"] and not frame.empty and cell.runs:
                have = {norm(s) for s in frame.set_index("run_dir").loc[cell.runs, "seed"]}
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
    return bool((matches(frame, {**spec["filters"], **col["match"]}) & frame[col["metric"]].notna()).any())


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


def spread(cell: Cell, col: dict) -> float | None:
    """The +- of a metric cell: std over seeds, else half the 95 % interval, else the standard error."""
    if col["kind"] == "relative":
        return None
    if len(cell.values) > 1:
        return cell.std if cell.std > 0 else None
    if cell.ci:
        return (cell.ci[1] - cell.ci[0]) / 2
    return cell.stderr


def best_rows(table: Table, j: int) -> set[int]:
    """The rows whose value of column ``j`` is the best (at the shown precision; the reference excluded)."""
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


# ------------------------------------------------------------- what is shown, in any format


@dataclass
class Shown:
    """What one cell shows, before a renderer writes it as LaTeX or Markdown.

    ``mark`` replaces the value: ``"missing"`` (no run), ``"none"`` (a change with nothing to compare:
    the reference row, or a missing run) or ``"ambiguous"``. Numbers are already formatted.
    """

    mark: str | None = None
    value: str = ""
    bold: bool = False
    spread: str | None = None  # the +- part
    interval: tuple[str, str] | None = None  # a change's paired 95 % interval
    unpaired: bool = False  # a change without a paired interval
    duplicate: bool = False  # disagreeing duplicate runs, the newest shown
    stale: bool = False  # a run of an older results version


def shown(cell: Cell, col: dict, bold: bool) -> Shown:
    """What a cell shows.

    A metric cell: mean (bold if best), then +- the std over seeds, or for one run +- the half-width
    of its 95 % interval or its standard error; flagged for disagreeing duplicates. A relative cell:
    the signed change and its paired 95 % interval ``[lo, hi]``, or flagged as unpaired.
    """
    if cell.ambiguous:
        return Shown(mark="ambiguous")
    if not cell.values:
        return Shown(mark="none" if col["kind"] == "relative" else "missing")
    scale = 100.0 if col["format"] == "pct" else 1.0
    d = col["decimals"]
    relative = col["kind"] == "relative"
    out = Shown(value=f"{cell.mean * scale:{'+' if relative else ''}.{d}f}", bold=bold, duplicate=cell.duplicate,
                stale=cell.stale)
    sp = spread(cell, col)
    if sp is not None:
        out.spread = f"{sp * scale:.{d}f}"
    if relative and cell.ci:
        out.interval = (f"{cell.ci[0] * scale:+.{d}f}", f"{cell.ci[1] * scale:+.{d}f}")
    out.unpaired = relative and not cell.ci
    return out


@dataclass(frozen=True)
class Style:
    """How a renderer writes a cell: ``%s`` templates for the parts, and the marks."""

    bold: str  # the value
    spread: str  # the +- part
    interval: str  # lo, hi
    unpaired: str
    duplicate: str
    ambiguous: str
    none: str  # a change with nothing to compare
    missing: str  # a missing run (a spec's ``missing_marker`` replaces it)
    stale: str = ""  # a run of an older results version


def write_cell(cell: Cell, col: dict, bold: bool, style: Style, marker: str | None = None) -> str:
    """One cell in a renderer's style (see :func:`shown`)."""
    s = shown(cell, col, bold)
    if s.mark == "missing" and col.get("missing"):  # a column's own words for an empty cell
        return col["missing"]
    if s.mark:
        return marker if s.mark == "missing" and marker else getattr(style, s.mark)
    text = style.bold % s.value if s.bold else s.value
    if s.spread is not None:
        text += style.spread % s.spread
    if s.interval:
        text += style.interval % s.interval
    return (text + (style.unpaired if s.unpaired else "") + (style.duplicate if s.duplicate else "")
            + (style.stale if s.stale else ""))


def notes(table: Table) -> list[str]:
    """Which explanations the table needs below it, in order (keys; each renderer has the words)."""
    flat = [c for line in table.cells for c in line]
    shown_cells = [(c, col) for line in table.cells for c, col in zip(line, table.columns)
                   if c.values and not c.ambiguous]
    metric = [c for c, col in shown_cells if col["kind"] != "relative" and spread(c, col) is not None]
    relative = [c for c, col in shown_cells if col["kind"] == "relative"]
    wanted = {
        "seeds": any(len(c.values) > 1 for c in flat),
        "ci": any(len(c.values) == 1 and c.ci for c in metric),
        "stderr": any(len(c.values) == 1 and not c.ci for c in metric),
        "paired": any(c.ci for c in relative),
        "unpaired": any(not c.ci for c in relative),
        "missing": any(c.missing for line in table.cells for c, col in zip(line, table.columns)
                       if col["kind"] != "relative" and not col.get("missing")),
        "ambiguous": any(c.ambiguous for c in flat),
        "duplicate": any(c.duplicate for c in flat),
        "stale": any(c.stale for c in flat),
    }
    return [k for k, v in wanted.items() if v]


def sections(table: Table) -> list[list[int]]:
    """The row indices in groups: one per ``sections`` value (the reference row alone), else reference / rest."""
    rows, key = table.spec["rows"], table.spec["sections"]
    out, prev = [], object()
    for i, row in enumerate(rows):
        value = "__ref__" if row["reference"] else row["match"].get(key) if key else None
        if not out or (key and value != prev) or (not key and row["reference"] != rows[i - 1]["reference"]):
            out.append([])
        prev = value
        out[-1].append(i)
    return out


def column_groups(columns: list[dict]) -> list[dict]:
    """Runs of columns under one ``group`` label: ``{label, span, first, last}`` (1-based, after the row label)."""
    groups = []
    if any(c["group"] for c in columns):
        for j, c in enumerate(columns):
            if groups and groups[-1]["label"] == c["group"]:
                groups[-1]["span"] += 1
                groups[-1]["last"] = j + 2
            else:
                groups.append({"label": c["group"], "span": 1, "first": j + 2, "last": j + 2})
    return groups
