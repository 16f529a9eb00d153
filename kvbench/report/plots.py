"""Plots of a spec (``plots:``): ``pareto`` (y against average bits, the Pareto front per series) and ``drop``
(each row's degradation against the reference row, per metric column); PDF + PNG beside the table.
"""

from __future__ import annotations

import math
from pathlib import Path

from kvbench.report.spec import rebuild_command
from kvbench.report.table import Table, identity_columns, matches, norm


def _series_label(row, series: list[str]) -> str:
    return " ".join(str(norm(row.get(k))) for k in series if norm(row.get(k)) is not None)


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

    Unquantized runs (``metrics.avg_bits >= 16``; without that column, ``x >= 16``) are drawn as horizontal
    reference lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sub = frame[matches(frame, {**spec["filters"], **plot["match"]})] if not frame.empty else frame
    x, y = plot["x"], plot["y"]
    if not sub.empty and x in sub.columns and y in sub.columns:
        sub = sub[sub[x].notna() & sub[y].notna()]
        ident = [c for c in identity_columns(sub, []) if c in sub.columns]
        key = [repr(tuple(norm(v) for v in r)) for r in sub[ident].itertuples(index=False)]
        bits = "metrics.avg_bits" if "metrics.avg_bits" in sub.columns else x
        pts = sub.assign(_k=key).groupby("_k").agg(
            {x: "mean", y: "mean", bits: "mean", **{k: "first" for k in plot["series"] if k in sub.columns}})
        labels = pts.apply(lambda r: _series_label(r, plot["series"]), axis=1) if len(pts) else []
        for i, (name, g) in enumerate(pts.groupby(list(labels), sort=True)):
            color = f"C{i % 10}"
            ref = g[g[bits] >= 16]
            if len(ref):
                ax.axhline(ref[y].mean(), color=color, ls="--", lw=1, label=f"{name} (16 bits)")
            g = g[g[bits] < 16].sort_values([x, y])
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
    return _save(fig, out / plot["name"], rebuild_command(spec))


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
    return _save(fig, out / plot["name"], rebuild_command(spec))


def _save(fig, stem: Path, command: str) -> list[Path]:
    """PDF + PNG with reproducible bytes; the command that rebuilds them is in their metadata."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    paths = [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    fig.savefig(paths[0], metadata={"CreationDate": None, "Producer": None, "Subject": command})
    fig.savefig(paths[1], dpi=150, metadata={"Software": None, "Description": command})
    plt.close(fig)
    return paths


def draw(frame, table: Table, plot: dict, out: Path) -> list[Path]:
    """Draw one of a spec's plots into ``out``; returns its PDF and PNG."""
    return plot_pareto(frame, table.spec, plot, out) if plot["kind"] == "pareto" else plot_drop(table, plot, out)
