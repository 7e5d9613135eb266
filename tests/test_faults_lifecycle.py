"""The launcher's promises under faults, with the lightweight worker as the engine (vLLM's own fault tests
are in test_faults_vllm.py): it says truthfully whether the run worked, leaves nothing running, and loses
nothing measured. Each test starts the real CLI in a child process and injects one fault: a signal in a
given phase, the engine's model process killed, the launcher killed, a grid interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.faults import LIGHTWEIGHT, Launch, engine_process

pytestmark = pytest.mark.integration

# One load level of a few seconds on 2 cores (the tiny model serves ~100 requests/s at c4).
LONG_LEVEL = ("benchmark=online", "benchmark.input_len=32", "benchmark.output_len=32",
              "benchmark.num_prompts=3000", "benchmark.warmup_requests=2")  # fmt: skip
# c1 then c4, each running for a fixed time.
TWO_TIMED_LEVELS = ("benchmark=online", "benchmark.input_len=32", "benchmark.output_len=32",
                    "benchmark.duration_s=5", "benchmark.warmup_requests=2", "benchmark.concurrency=[1,4]",
                    "engine.port=0")  # fmt: skip
EXIT_FOR = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def level(summary: dict, label: str) -> dict:
    return next(lvl for lvl in summary["benchmark"]["levels"] if lvl["label"] == label)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_during_a_load_level_stops_the_run(tmp_path: Path, sig: signal.Signals) -> None:
    with Launch(tmp_path, *LIGHTWEIGHT, *LONG_LEVEL, "benchmark.concurrency=[4]", "engine.port=0") as launch:
        launch.wait_for_phase("benchmark")
        time.sleep(1.0)
        summary = launch.stopped_by(sig)
    assert summary["phase"] == "benchmark" and summary["exit_code"] == EXIT_FOR[sig]
    c4 = level(summary, "c4")
    assert c4["complete"] is False and c4["cut_short"] == f"interrupted by {sig.name}"
    assert c4["output_throughput"] is None and c4["request_throughput"] is None
    assert 0 < c4["completed"] < 3000 and c4["not_sent"] > 0
    result = json.loads((launch.run_dir / "bench-c4" / "result.json").read_text())
    assert result["complete"] is False and result["output_throughput"] is None
    lines = (launch.run_dir / "bench-c4" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == c4["completed"] + c4["failed"]
    assert f"interrupted by {sig.name}" in launch.stderr()
    launch.assert_nothing_left(launch.port())


def test_sigterm_during_the_warm_up_stops_the_run(tmp_path: Path) -> None:
    warm_up_only = ("benchmark.warmup_requests=3000", "benchmark.num_prompts=4", "benchmark.concurrency=[4]")
    with Launch(tmp_path, *LIGHTWEIGHT, *LONG_LEVEL, *warm_up_only, "engine.port=0") as launch:
        launch.wait_for_phase("warm-up")
        summary = launch.stopped_by(signal.SIGTERM)
    assert summary["phase"] == "warm-up" and summary["benchmark"]["levels"] == []
    launch.assert_nothing_left(launch.port())


def test_a_signal_during_teardown_is_reported_as_interrupted(tmp_path: Path) -> None:
    """The benchmark finished; the signal came while the engine was being stopped. Exit status and summary
    agree (interrupted, in teardown), and every level is there, complete."""
    with Launch(tmp_path, *LIGHTWEIGHT, "benchmark.concurrency=[1,4]", "engine.port=0") as launch:
        launch.wait_for_stderr("stopping lightweight")
        summary = launch.stopped_by(signal.SIGTERM)
    assert summary["phase"] == "teardown"
    levels = summary["benchmark"]["levels"]
    assert [lvl["complete"] for lvl in levels] == [True, True]
    assert all(lvl["output_throughput"] > 0 for lvl in levels)
    launch.assert_nothing_left(launch.port())


def test_the_engine_dying_in_the_last_level_fails_the_run(tmp_path: Path) -> None:
    """The model process (what the OOM killer picks) is killed during the last level: exit 3, the level
    is marked cut short without throughput, the earlier level is kept whole."""
    with Launch(tmp_path, *LIGHTWEIGHT, *TWO_TIMED_LEVELS) as launch:
        launch.wait_for("level c1 done", lambda: (launch.run_dir / "bench-c1" / "result.json").exists())
        model = engine_process(launch, "spawn_main")
        time.sleep(1.0)
        os.kill(model, signal.SIGKILL)
        code = launch.finish(120)
    assert code == 3, launch.stderr()[-3000:]
    summary = launch.summary()
    assert summary is not None
    assert summary["status"] == "failed" and summary["exit_code"] == 3 and summary["phase"] == "benchmark"
    c1, c4 = level(summary, "c1"), level(summary, "c4")
    assert c1["complete"] is True and c1["output_throughput"] > 0
    assert c4["complete"] is False and c4["cut_short"].startswith("the engine failed")
    assert c4["output_throughput"] is None and c4["failed"] > 0
    assert "failed during load level c4" in summary["error"]
    assert "failed during load level c4" in launch.stderr()
    launch.assert_nothing_left(launch.port())


def test_a_killed_launcher_keeps_the_finished_levels_and_leaves_nothing(tmp_path: Path) -> None:
    """SIGKILL of llmstack itself: summary.json already holds the finished level (it is written after
    each one), and the guardian stops the engine."""
    with Launch(tmp_path, *LIGHTWEIGHT, *TWO_TIMED_LEVELS) as launch:
        launch.wait_for("level c1 done", lambda: (launch.run_dir / "bench-c1" / "result.json").exists())
        launch.wait_for("c1 in summary.json", lambda: len((launch.summary() or {}).get("benchmark", {})
                                                           .get("levels", [])) == 1)  # fmt: skip
        launch.signal(signal.SIGKILL)
        assert launch.finish(30) == -signal.SIGKILL
    summary = launch.summary()
    assert summary is not None
    assert summary["status"] == "running" and summary["launcher_pid"] == launch.proc.pid
    assert level(summary, "c1")["complete"] is True
    launch.assert_nothing_left(launch.port(), timeout=40)
    assert "the launcher died without stopping the engine" in (launch.run_dir / "server.log").read_text()


GRID = ("engine.max_batch_size=4,8", "benchmark=online", "benchmark.input_len=32", "benchmark.output_len=32",
        "benchmark.num_prompts=600", "benchmark.warmup_requests=2", "benchmark.concurrency=[4]",
        "engine.port=0")  # fmt: skip


def job_dirs(launch: Launch) -> dict[str, Path]:
    root = launch.results / "faults"
    return {p.name: p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}


def test_a_grid_stops_on_sigterm_and_resumes_on_the_next_run(tmp_path: Path) -> None:
    with Launch(tmp_path, *LIGHTWEIGHT, *GRID, multirun=True) as first:
        first.wait_for("job 0 benchmarking", lambda: any(
            (s := first.summary(p)) and s.get("phase") == "benchmark" for p in job_dirs(first).values()
        ))  # fmt: skip
        first.signal(signal.SIGTERM)
        code = first.finish(120)
    assert code == 143, first.stderr()[-3000:]
    jobs = job_dirs(first)
    assert len(jobs) == 1, f"the grid went on to the next job: {sorted(jobs)}"
    (job0,) = jobs.values()
    assert (first.summary(job0) or {}).get("status") == "interrupted"
    assert not (job0 / "failure.json").exists(), "an interruption is not a failed job"
    first.assert_nothing_left()

    second = Launch(tmp_path, *LIGHTWEIGHT, *GRID, multirun=True)
    assert second.finish(300) == 0, second.stderr()[-3000:]
    jobs = job_dirs(second)
    assert len(jobs) == 2 and all((second.summary(p) or {}).get("status") == "ok" for p in jobs.values())
    second.assert_nothing_left()


def test_ctrl_c_during_a_grid_jobs_teardown_stops_the_grid(tmp_path: Path) -> None:
    with Launch(tmp_path, *LIGHTWEIGHT, *GRID[:-4], "benchmark.num_prompts=8", "benchmark.concurrency=[4]",
                    "benchmark.warmup_requests=2", "engine.port=0", multirun=True) as launch:  # fmt: skip
        launch.wait_for_stderr("stopping lightweight")
        launch.signal(signal.SIGINT)
        code = launch.finish(120)
    assert code == 130, launch.stderr()[-3000:]
    jobs = job_dirs(launch)
    assert len(jobs) == 1, f"the grid went on to the next job: {sorted(jobs)}"
    summary = launch.summary(next(iter(jobs.values())))
    assert summary is not None and (summary["status"], summary["phase"]) == ("interrupted", "teardown")
    launch.assert_nothing_left()
