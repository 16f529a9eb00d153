"""``python -m kvbench.report [SPEC ...] [--all [FOLDER]] [--pdf] [--run-missing] [--runs STORE]``.

Writes each spec's ``.tex`` and plots (beside the spec, or ``--out``), its Markdown page
(``docs/results/<name>.md``, or ``--pages``; with ``--out``, the ``--out`` folder), with ``--all``
``paper.tex``; then, when the pages went to ``docs/results``, refreshes the include blocks of
``*.md`` and ``docs/**/*.md`` (paths relative to the working directory, the repository root).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvbench import report
from kvbench.errors import UserError

PAGES = Path("docs") / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvbench.report", description=report.__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="*", help="table specs (reports/<name>.yaml)")
    p.add_argument("--all", nargs="?", const="reports", metavar="FOLDER",
                   help="every *.yaml in FOLDER (default reports/), and FOLDER/paper.tex")
    p.add_argument("--runs", help="results store to read instead of each spec's `runs` (a folder or wandb:ENTITY/PROJECT)")
    p.add_argument("--out", help="output folder (default: the spec's folder)")
    p.add_argument("--pages", help=f"folder of the Markdown pages (default: {PAGES}; with --out, that folder)")
    p.add_argument("--run-missing", action="store_true", help="run the missing runs first, then report")
    p.add_argument("--pdf", action="store_true", help="with --all: also compile paper.tex with pdflatex")
    a = p.parse_args(argv)
    pages = Path(a.pages or a.out or PAGES)
    try:
        paths = [Path(s) for s in a.specs] + (report.spec_paths(a.all) if a.all else [])
        if not paths:
            p.error("give a spec (reports/<name>.yaml) or --all")
        specs = [report.load_spec(s) for s in paths]
        frames = {}
        for spec in specs:
            source = a.runs or spec["runs"]
            if a.run_missing:
                todo = report.build_table(frames[source] if source in frames else report.load_frame(source),
                                          spec).missing
                if todo:
                    report.run_missing(todo)
                    frames.pop(source, None)
            if source not in frames:
                frames[source] = report.load_frame(source)
            res = report.build(spec, frames[source], a.out, source, pages)
            print(f"kvbench.report | {res['tex']} from {res['table'].n_runs} runs in {source}"
                  + "".join(f", {q}" for q in [res["page"], *res["plots"]]))
            _problems(res)
        if a.all:
            folder = Path(a.out or a.all)
            paper = folder / "paper.tex"
            paper.write_text(report.render_paper(specs, folder, "python -m kvbench.report --all"))
            print(f"kvbench.report | {paper} (build: cd {folder} && pdflatex paper.tex)")
            if a.pdf:
                print(f"kvbench.report | {report.compile_pdf(paper)}")
        if pages == PAGES:
            for md in report.refresh_includes("."):
                print(f"kvbench.report | {md} (include blocks refreshed)")
    except UserError as e:
        print(f"kvbench.report: error: {e}", file=sys.stderr)
        return 2
    return 0


def _problems(res: dict) -> None:
    if res["missing"]:
        print(f"  missing runs ({len(res['missing'])}), each produced by:")
        for cmd in res["missing"]:
            print(f"    {cmd}")
    for d in res["duplicates"]:
        print(f"  duplicate: {d}")
    for d in res["table"].ambiguous:
        print(f"  ambiguous: {d}")


if __name__ == "__main__":
    sys.exit(main())
