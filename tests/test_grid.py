"""Grids: job expansion (product, linked axes, load axes), job names, reports and regressions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from hydra_plugins.llmstack_sweeper.sweeper import LOAD_KEYS, grid_jobs
from llmstack.grid import job_dir_name
from llmstack.grid_sweep import SOME_JOBS_FAILED
from llmstack.report import collect_rows, compare, main, to_csv


def jobs(*args: str, link: list[list[str]] | None = None) -> list[list[str]]:
    overrides = OverridesParser.create().parse_overrides(list(args))
    return grid_jobs(overrides, link or [], set(LOAD_KEYS))


def test_product_of_server_axes() -> None:
    assert jobs("low_bit=none,bf16", "engine.max_num_seqs=8,16") == [
        ["low_bit=none", "engine.max_num_seqs=8"],
        ["low_bit=none", "engine.max_num_seqs=16"],
        ["low_bit=bf16", "engine.max_num_seqs=8"],
        ["low_bit=bf16", "engine.max_num_seqs=16"],
    ]


def test_load_axes_stay_in_one_job() -> None:
    assert jobs("low_bit=none,bf16", "benchmark.concurrency=1,4,16") == [
        ["low_bit=none", "benchmark.concurrency=[1,4,16]"],
        ["low_bit=bf16", "benchmark.concurrency=[1,4,16]"],
    ]


def test_a_single_load_level_becomes_a_list() -> None:
    assert jobs("low_bit=none,bf16", "benchmark.concurrency=4") == [
        ["low_bit=none", "benchmark.concurrency=[4]"],
        ["low_bit=bf16", "benchmark.concurrency=[4]"],
    ]


def test_linked_axes_are_zipped() -> None:
    got = jobs("engine.max_num_seqs=8,16", "benchmark.concurrency=8,16", "low_bit=none,bf16",
               link=[["engine.max_num_seqs", "benchmark.concurrency"]])  # fmt: skip
    assert got == [
        ["engine.max_num_seqs=8", "benchmark.concurrency=[8]", "low_bit=none"],
        ["engine.max_num_seqs=8", "benchmark.concurrency=[8]", "low_bit=bf16"],
        ["engine.max_num_seqs=16", "benchmark.concurrency=[16]", "low_bit=none"],
        ["engine.max_num_seqs=16", "benchmark.concurrency=[16]", "low_bit=bf16"],
    ]


def test_linked_axes_need_equal_lengths() -> None:
    with pytest.raises(HydraException, match="as many values"):
        jobs("engine.max_num_seqs=8,16", "benchmark.concurrency=8,16,32",
             link=[["engine.max_num_seqs", "benchmark.concurrency"]])  # fmt: skip


def test_linked_axis_must_be_swept() -> None:
    with pytest.raises(HydraException, match="does not sweep"):
        jobs("engine.max_num_seqs=8,16", link=[["engine.max_num_seqs", "benchmark.concurrency"]])


def test_job_dir_name_is_stable_safe_and_ignores_bookkeeping() -> None:
    a = job_dir_name(["low_bit=bf16", "engine.max_num_seqs=8", "experiment_name=x", "rerun=true"])
    b = job_dir_name(["engine.max_num_seqs=8", "low_bit=bf16", "results_dir=/tmp/r"])
    assert a == b == "low_bit=bf16,engine.max_num_seqs=8"
    assert "/" not in job_dir_name(["model.path=/data/models/x"])
    long = job_dir_name([f"+engine.extra_env.K{i}=v" for i in range(40)])
    assert len(long) <= 160 and long != job_dir_name([f"+engine.extra_env.K{i}=w" for i in range(40)])


def _job(root: Path, name: str, levels: list[dict] | None = None, failure: str | None = None) -> None:
    d = root / name
    d.mkdir(parents=True)
    if failure:
        (d / "failure.json").write_text(json.dumps({"phase": "startup", "error": failure}))
        return
    summary = {"status": "ok", "engine": "vllm-upstream", "model": "tiny", "low_bit": name, "device": "cpu",
               "benchmark": {"levels": levels or []}}  # fmt: skip
    (d / "summary.json").write_text(json.dumps(summary))
    for level in levels or []:
        (d / f"bench-{level['label']}").mkdir()
        (d / f"bench-{level['label']}" / "result.json").write_text(json.dumps({"p99_ttft_ms": 9.0, **level}))


def _levels(scale: float) -> list[dict]:
    return [
        {"label": f"c{c}", "concurrency": c, "completed": 8, "failed": 0,
         "output_throughput": 100.0 * c * scale, "request_throughput": 2.0 * c * scale,
         "mean_ttft_ms": 10.0 / scale, "median_ttft_ms": 9.0,
         "mean_tpot_ms": 5.0, "median_tpot_ms": 5.0, "p99_tpot_ms": 6.0}
        for c in (1, 4)
    ]  # fmt: skip


def test_report_rows_files_and_plots(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    _job(exp, "none", _levels(1.0))
    _job(exp, "bf16", _levels(2.0))
    _job(exp, "fp6", failure="engine exited with status 1")
    rows = collect_rows(exp)
    assert [(r["job"], r.get("level"), r["status"]) for r in rows] == [
        ("bf16", "c1", "ok"), ("bf16", "c4", "ok"), ("fp6", None, "failed"),
        ("none", "c1", "ok"), ("none", "c4", "ok"),
    ]  # fmt: skip
    assert rows[1]["output_throughput"] == 800.0 and rows[1]["p99_ttft_ms"] == 9.0
    assert to_csv(rows).splitlines()[0].startswith("job,status,engine,model,low_bit")
    assert main([str(exp)]) == 0
    for name in ("summary.csv", "summary.md", "throughput.png", "ttft.png", "tpot.png"):
        assert (exp / name).stat().st_size > 0, name
    assert "engine exited with status 1" in (exp / "summary.md").read_text()


def test_a_failed_jobs_levels_stay_in_the_report_and_a_cut_short_one_says_so(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    levels = _levels(1.0)
    levels[1].update(complete=False, cut_short="the engine failed: its process VLLM::Worker (pid 7) died",
                     output_throughput=None, request_throughput=None)  # fmt: skip
    _job(exp, "bf16", levels)
    (exp / "bf16" / "failure.json").write_text(json.dumps({"phase": "benchmark", "error": "engine failed"}))
    rows = collect_rows(exp)
    assert [(r["level"], r["status"], r["complete"]) for r in rows] == [
        ("c1", "failed", "yes"),
        ("c4", "failed", "cut short: the engine failed: its process VLLM::Worker (pid 7) died"),
    ]
    assert "output_throughput" not in rows[1] and rows[0]["error"] == "engine failed"
    assert main([str(exp)]) == 0
    assert "cut short: the engine failed" in (exp / "summary.md").read_text()


def test_offline_jobs_have_a_row(tmp_path: Path) -> None:
    job = tmp_path / "exp" / "offline"
    job.mkdir(parents=True)
    result = {"num_requests": 16, "requests_per_second": 31.9, "output_tokens_per_second": 514.0,
              "tokens_per_second": 1028.0}  # fmt: skip
    summary = {"status": "ok", "engine": "vllm-upstream", "model": "tiny", "low_bit": "none", "device": "cpu",
               "benchmark": {"result": result}}  # fmt: skip
    (job / "summary.json").write_text(json.dumps(summary))
    (row,) = collect_rows(tmp_path / "exp")
    assert (row["level"], row["completed"], row["output_throughput"]) == ("offline", 16, 514.0)


def test_compare_gives_relative_deltas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _job(tmp_path / "a", "none", _levels(1.0))
    _job(tmp_path / "b", "none", _levels(1.5))
    deltas = compare(collect_rows(tmp_path / "a"), collect_rows(tmp_path / "b"))
    assert [d["level"] for d in deltas] == ["c1", "c4"]
    assert deltas[0]["output_throughput"] == pytest.approx(0.5)
    assert deltas[0]["mean_ttft_ms"] == pytest.approx(-1 / 3)
    assert main([str(tmp_path / "a"), "--compare", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "+50.0%" in out and "-33.3%" in out
    assert (tmp_path / "b" / "compare-a.md").is_file()


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (Path(__file__).parent.parent / "configs/experiment").glob("*.yaml"))
)
def test_checked_in_experiments_expand(tmp_path: Path, name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llmstack", "-m", f"+experiment={name}", "device=cpu", "dry_run=true",
         f"results_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("-m vllm.entrypoints.openai.api_server") >= 1
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def _dry_grid(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "llmstack",
        "-m",
        "device=cpu",
        "dry_run=true",
        f"results_dir={tmp_path}/r",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_a_grid_dry_run_prints_every_plan_and_writes_nothing(tmp_path: Path) -> None:
    # Before: multirun.yaml, summary.csv/md (and failure.json for invalid jobs) were written.
    done = _dry_grid(tmp_path, "low_bit=none,bf16")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("# llmstack dry run:") == 2
    assert list(tmp_path.iterdir()) == []


def test_every_invalid_job_is_reported_before_any_job_starts(tmp_path: Path) -> None:
    # Before: job 0 ran (here: printed its plan), then job 1 failed, then job 2 ran; the exit status was the
    # number of failed jobs.
    done = _dry_grid(tmp_path, "low_bit=fp6,none,fp8")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "# llmstack dry run:" not in done.stdout  # no job was started
    paragraphs = [line for line in done.stderr.splitlines() if line.startswith("llmstack: grid job ")]
    assert len(paragraphs) == 2
    assert "low_bit=fp6" in paragraphs[0] and "Valid choices: bf16, fp16, none" in paragraphs[0]
    assert "low_bit=fp8" in paragraphs[1]
    assert "2 of 3 grid jobs are invalid, so none was started" in done.stderr
    assert "hydra.sweeper.keep_going_on_invalid=true" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_keep_going_on_invalid_runs_the_valid_jobs_and_exits_with_the_grid_status(tmp_path: Path) -> None:
    done = _dry_grid(tmp_path, "low_bit=fp6,none,fp8", "hydra.sweeper.keep_going_on_invalid=true")
    assert done.returncode == SOME_JOBS_FAILED == 5, done.stderr[-2000:]
    assert done.stdout.count("# llmstack dry run:") == 1
    assert "2 of 3 grid jobs failed" in done.stderr
    assert list(tmp_path.iterdir()) == []
