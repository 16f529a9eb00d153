"""A table spec: loading, validation, defaults and row expansion (the format is in ``kvbench.report``)."""

from __future__ import annotations

import re
from itertools import product
from pathlib import Path

from kvbench.errors import UserError

SPEC_KEYS = {"name", "caption", "label", "runs", "filters", "overrides", "metric", "decimals", "best",
             "ignore", "seeds", "sections", "rows", "columns", "plots", "missing_marker", "row_header", "order"}
ROW_KEYS = {"label", "match", "expand", "reference", "ignore"}
COLUMN_KEYS = {"label", "group", "match", "metric", "decimals", "best", "format", "relative", "average", "ignore",
               "optional", "missing"}
PLOT_KEYS = {"name", "kind", "x", "y", "series", "match", "caption", "label", "logy", "width", "xlabel", "ylabel"}


def _check_keys(d: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(allowed)}")


def load_spec(path: str | Path) -> dict:
    """Read and validate a table spec; rows are expanded, defaults filled in.

    Args:
        path: the spec's YAML file (``reports/<name>.yaml``).

    Returns:
        The spec dict with ``rows``/``columns``/``plots`` as lists of normalised dicts and
        ``path``/``name`` set. ``missing_marker`` is None unless the spec sets one (each renderer
        then uses its own: ``$\\emptyset$`` in LaTeX, ``∅`` in Markdown).
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
            "ignore": [], "seeds": None, "sections": None, "plots": [], "missing_marker": None,
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
    spec["columns"] = [_column(c, i, spec) for i, c in enumerate(spec["columns"])]
    spec["plots"] = [_plot(p, i, spec) for i, p in enumerate(spec["plots"])]
    return spec


def _column(c: dict, i: int, spec: dict) -> dict:
    where = f"{spec['path']}: columns[{i}]"
    _check_keys(c, COLUMN_KEYS, where)
    if c.get("best", spec["best"]) not in ("min", "max", "none"):
        raise UserError(f"{where}.best must be min, max or none")
    if c.get("relative") not in (None, "diff", "pct"):
        raise UserError(f"{where}.relative must be diff or pct")
    return {"label": str(c.get("label", f"col{i}")), "group": c.get("group"), "match": c.get("match") or {},
            "metric": c.get("metric", spec["metric"]), "decimals": c.get("decimals", spec["decimals"]),
            "best": c.get("best", spec["best"]), "format": c.get("format"),
            "relative": c.get("relative"), "average": c.get("average"), "ignore": c.get("ignore") or [],
            "optional": bool(c.get("optional")), "missing": c.get("missing")}


def _plot(p: dict, i: int, spec: dict) -> dict:
    _check_keys(p, PLOT_KEYS, f"{spec['path']}: plots[{i}]")
    if p.get("kind") not in ("pareto", "drop"):
        raise UserError(f"{spec['path']}: plots[{i}].kind must be pareto or drop")
    plot = {"name": f"{spec['name']}_{p['kind']}", "caption": "", "label": None, "logy": False,
            "width": 0.7, "series": ["method.name"], "match": {}, "x": "metrics.avg_bits", "y": spec["metric"], **p}
    plot["label"] = plot["label"] or f"fig:{plot['name']}"
    return plot


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


def rel(path) -> str:
    """``path`` relative to the working directory when it lies below it (how commands name files)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def rebuild_command(spec: dict) -> str:
    """The command that rebuilds a spec's outputs."""
    return f"python -m kvbench.report {rel(spec['path'])}"
