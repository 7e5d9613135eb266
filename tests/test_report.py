"""Reports: a grid's covers exactly its jobs, its axes say what varied, comparisons say what they paired."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llmstack.report import build_report, collect_rows, main
from llmstack.report.plots import layout


def _run(d: Path, levels: list[dict], low_bit: str = "none") -> Path:
    """A run's directory as a run writes it: summary.json and bench-<level>/result.json."""
    d.mkdir(parents=True)
    summary = {"status": "ok", "engine": "vllm-upstream", "model": "tiny", "low_bit": low_bit,
               "device": "cpu", "benchmark": {"levels": levels}}  # fmt: skip
    (d / "summary.json").write_text(json.dumps(summary))
    for level in levels:
        (d / f"bench-{level['label']}").mkdir()
        (d / f"bench-{level['label']}" / "result.json").write_text(json.dumps(level))
    return d


def _levels(scale: float, concurrency: tuple[int, ...] = (1, 4)) -> list[dict]:
    return [
        {"label": f"c{c}", "concurrency": c, "request_rate": "inf", "completed": 8, "failed": 0,
         "output_throughput": 100.0 * c * scale, "request_throughput": 2.0 * c * scale,
         "mean_ttft_ms": 10.0 / scale, "median_ttft_ms": 9.0, "p99_ttft_ms": 9.5,
         "mean_tpot_ms": 5.0, "median_tpot_ms": 5.0, "p99_tpot_ms": 6.0}
        for c in concurrency
    ]  # fmt: skip


def _grid(d: Path, jobs: dict[str, list[str]], scale: float = 1.0) -> Path:
    """A grid's directory: grid.json (its jobs and their overrides) and one run directory per job."""
    for name in jobs:
        _run(d / name, _levels(scale))
    listing = {"jobs": [{"name": n, "overrides": o} for n, o in jobs.items()]}
    (d / "grid.json").write_text(json.dumps(listing))
    return d


MNS = {
    "benchmark.concurrency=[1,4],engine.max_num_seqs=4": [
        "engine.max_num_seqs=4",
        "benchmark.concurrency=[1,4]",
    ],
    "benchmark.concurrency=[1,4],engine.max_num_seqs=8": [
        "engine.max_num_seqs=8",
        "benchmark.concurrency=[1,4]",
    ],
}


def test_a_concurrency_sweep_is_labelled_by_concurrency_and_each_varied_axis_is_its_own_line(
    tmp_path: Path,
) -> None:
    # Before: x labelled "request rate (req/s)" (request_rate is the string "inf"), and both jobs (same
    # engine/low_bit/model) drawn as one line.
    chart = layout(collect_rows(_grid(tmp_path / "g", MNS)))
    assert chart is not None
    assert chart.xlabel.startswith("concurrency")
    assert sorted(chart.series) == ["engine.max_num_seqs=4", "engine.max_num_seqs=8"]
    assert [p["_x"] for p in chart.series["engine.max_num_seqs=4"]] == [1.0, 4.0]


def test_linked_axes_draw_one_line_through_their_jobs(tmp_path: Path) -> None:
    g = tmp_path / "g"
    for m in (4, 8):
        _run(g / f"m{m}", _levels(1.0, (m,)))
    listing = [{"name": f"m{m}", "overrides": [f"engine.max_num_seqs={m}", f"benchmark.concurrency=[{m}]"]}
               for m in (4, 8)]  # fmt: skip
    (g / "grid.json").write_text(json.dumps({"jobs": listing}))
    chart = layout(collect_rows(g))
    assert chart is not None and list(chart.series) == ["engine.max_num_seqs (one job per point)"]


def test_a_grids_report_covers_exactly_its_jobs(tmp_path: Path) -> None:
    g = _grid(tmp_path / "day", MNS)
    _run(g / "20261203-101500", _levels(3.0))  # a single run of the same day, not a job of this grid
    written = build_report(g)
    rows = list(csv.DictReader((g / "summary.csv").open()))
    assert sorted({r["job"] for r in rows}) == sorted(MNS)
    assert "20261203-101500" not in (g / "summary.md").read_text()
    assert {p.name for p in written} >= {"summary.csv", "summary.md", "throughput.png"}


def test_report_on_a_single_run_says_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "20261203-101500", _levels(1.0))
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run}: a single run (ok)" in out and "| c4 |" not in out.split("\n")[0]
    assert "| 20261203-101500 | ok | c1 |" in out
    assert not (run / "summary.csv").exists()  # a run's own directory is not written into


def test_two_single_runs_are_compared_and_the_file_written_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # README's form: two single runs, whose directory names (timestamps) never match.
    a = _run(tmp_path / "20261203-101500", _levels(1.0))
    b = _run(tmp_path / "20261203-111500", _levels(1.5))
    assert main([str(a), "--compare", str(b)]) == 0
    out = capsys.readouterr().out
    assert "+50.0%" in out and "-33.3%" in out
    assert f"wrote {b / 'compare-20261203-101500.md'}" in out


def test_grids_pair_jobs_by_the_settings_that_varied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _grid(tmp_path / "a", {"device=cpu,low_bit=none": ["device=cpu", "low_bit=none"],
                               "device=cpu,low_bit=bf16": ["device=cpu", "low_bit=bf16"]})  # fmt: skip
    b = _grid(tmp_path / "b", {"low_bit=none": ["low_bit=none"], "low_bit=fp16": ["low_bit=fp16"]}, scale=2.0)
    assert main([str(a), "--compare", str(b)]) == 0
    out = capsys.readouterr().out
    assert "| low_bit=none (vs device=cpu,low_bit=none) | c1 | +100.0%" in out
    assert "job low_bit=fp16: only in the new results" in out
    assert "job device=cpu,low_bit=bf16: only in the baseline" in out


def test_nothing_comparable_exits_non_zero_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _grid(tmp_path / "a", {"low_bit=none": ["low_bit=none"], "low_bit=bf16": ["low_bit=bf16"]})
    b = _grid(tmp_path / "b", {"low_bit=fp16": ["low_bit=fp16"], "low_bit=fp8": ["low_bit=fp8"]})
    assert main([str(a), "--compare", str(b)]) == 1
    captured = capsys.readouterr()
    assert "nothing could be compared" in captured.err
    assert "job low_bit=fp16: only in the new results" in captured.out
    assert not list(b.glob("compare-*.md"))


def test_a_directory_without_runs_is_said_so_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `report results/` (the runs are a level down, in results/<date>/) used to write an empty summary.md
    # there and exit 0.
    _run(tmp_path / "results" / "20261203" / "20261203-120000", _levels(1.0))
    assert main([str(tmp_path / "results")]) == 1
    err = capsys.readouterr().err
    assert "holds no run" in err and str(tmp_path / "results" / "20261203") in err
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["20261203"]
    assert main([str(tmp_path / "results" / "20261203")]) == 0
