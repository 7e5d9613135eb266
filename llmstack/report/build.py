"""A results directory's report: summary.csv, summary.md and the plots; for a capacity search
(llmstack.report.capacity) its capacity table, pareto.png and profile/best.yaml."""

from __future__ import annotations

from pathlib import Path

from llmstack.report.rows import collect_rows, to_csv, to_markdown


def build_report(experiment_dir: Path, jobs: list[str] | None = None) -> list[Path]:
    """Write summary.csv, summary.md and the plots into the experiment directory; the paths written.
    `jobs`: the job directories to cover (default: the grid's job list, else every subdirectory)."""
    from llmstack.report.plots import plot
    from llmstack.results.files import write_text_atomic

    rows = collect_rows(experiment_dir, jobs)
    written = [
        write_text_atomic(experiment_dir / "summary.csv", to_csv(rows)),
        write_text_atomic(experiment_dir / "summary.md", to_markdown(rows, f"# {experiment_dir.name}\n\n")),
    ]
    written += plot(rows, experiment_dir)
    from llmstack.report.capacity import load_search, write

    search = load_search(experiment_dir, jobs)
    if search is not None:  # a server-settings search: its capacity table replaces the per-probe one
        written = [p for p in written if p.name != "summary.md"] + write(search)
    return written
