"""Tables and plots across the jobs of a grid, and regressions between two results directories.

    python -m llmstack.report results/<experiment>                       # summary.csv, summary.md, *.png
    python -m llmstack.report results/<date>/<run>                       # one run: what it is, its table
    python -m llmstack.report results/<baseline> --compare results/<new>  # relative deltas, new vs baseline

Reads what runs wrote: each job's summary.json (or failure.json) and its bench-<level>/result.json; a grid's
job list (grid.json), so that its report covers exactly its jobs.
"""

from __future__ import annotations

from llmstack.report.build import build_report
from llmstack.report.compare import compare, compare_markdown, pair_rows
from llmstack.report.rows import COLUMNS, COMPARED, collect_rows, to_csv, to_markdown

__all__ = [
    "COLUMNS", "COMPARED", "build_report", "collect_rows", "compare", "compare_markdown", "main", "pair_rows",
    "to_csv", "to_markdown",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from llmstack.report.cli import main as cli_main

    return cli_main(argv)
