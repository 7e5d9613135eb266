"""`python -m llmstack.report`: what a results directory is, its report, or its comparison with another."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmstack.report.rows import collect_rows, grid_jobs, is_single_run, to_markdown

# Nothing could be paired between the two directories.
NOTHING_COMPARED = 1
# The directory holds no run (nor a grid's jobs): nothing is written.
NOTHING_TO_REPORT = 1


def main(argv: list[str] | None = None) -> int:
    from llmstack.report.build import build_report

    description = "Tables and plots across a grid's jobs, and regressions between two results directories."
    parser = argparse.ArgumentParser(prog="python -m llmstack.report", description=description)
    parser.add_argument("experiment", type=Path, help="a grid's, an experiment's or one run's directory "
                        "(the baseline with --compare)")  # fmt: skip
    parser.add_argument("--compare", type=Path, help="a second results directory, compared against the first")
    args = parser.parse_args(argv)
    for path in (args.experiment, args.compare):
        if path is not None and not path.is_dir():
            print(f"llmstack.report: {path} is not a directory", file=sys.stderr)
            return 2
    if args.compare is not None:
        return _compare(args.experiment, args.compare)
    print(describe(args.experiment))
    rows = collect_rows(args.experiment)
    if not rows:
        print(f"llmstack.report: {_nothing_to_report(args.experiment)}", file=sys.stderr)
        return NOTHING_TO_REPORT
    if is_single_run(args.experiment):
        print(to_markdown(rows))  # a run's own files (report.txt, result.json) stay as they are
        return 0
    for path in build_report(args.experiment):
        print(f"wrote {path}")
    from llmstack.report.capacity import load_search, markdown

    search = load_search(args.experiment)  # a settings search: its capacity table, as its summary.md
    print(markdown(search) if search is not None else to_markdown(rows))
    return 0


def describe(path: Path) -> str:
    """One line: what this directory holds."""
    if is_single_run(path):
        from llmstack.report.rows import read_json

        s = read_json(path / "summary.json") or {}
        what = ", ".join(f"{k} {s.get(k)}" for k in ("engine", "model", "low_bit", "device"))
        return f"{path}: a single run ({s.get('status', '?')}): {what}"
    jobs = grid_jobs(path)
    if jobs is not None:
        return f"{path}: a grid of {len(jobs)} jobs (grid.json)"
    runs = [p for p in path.iterdir() if p.is_dir() and is_single_run(p)]
    return f"{path}: a directory of {len(runs)} runs"


def _nothing_to_report(path: Path) -> str:
    holding = sorted(
        p for p in path.iterdir() if p.is_dir() and any(is_single_run(c) for c in p.iterdir() if c.is_dir())
    )
    where = f"; these directories in it do: {', '.join(str(p) for p in holding[:5])}" if holding else ""
    return f"{path} holds no run (no summary.json in it or its subdirectories), so nothing was written{where}"


def _compare(baseline: Path, new: Path) -> int:
    from llmstack.report.compare import compare as deltas_of
    from llmstack.report.compare import compare_markdown, pair_rows
    from llmstack.results.files import write_text_atomic

    old_rows, new_rows = collect_rows(baseline), collect_rows(new)
    print(describe(baseline))
    print(describe(new))
    pairing = pair_rows(old_rows, new_rows)
    deltas = deltas_of(old_rows, new_rows)
    text = f"# {new.name} vs {baseline.name}\n\n" + compare_markdown(deltas, pairing.unpaired)
    print(text)
    if not deltas:
        why = "no level of one pairs with a successful level of the other (see 'Not compared' above)"
        where = f"{baseline} and {new}"
        print(f"llmstack.report: nothing could be compared between {where}: {why}", file=sys.stderr)
        return NOTHING_COMPARED
    out = write_text_atomic(new / f"compare-{baseline.name}.md", text)
    print(f"wrote {out}")
    return 0
