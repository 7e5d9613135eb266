"""Real grids on CPU with vLLM and the tiny model: failures, resume, reports, parallel jobs, Ray."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.procs import wait_no_processes

pytestmark = pytest.mark.integration
MARK_KEY = "LLMSTACK_TEST_MARK"


def grid(tmp_path: Path, *args: str, mark: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "llmstack", "-m", "device=cpu", "engine.port=0", "engine.enforce_eager=true",
        f"results_dir={tmp_path}", "experiment_name=grid", f"+engine.extra_env.{MARK_KEY}={mark}", *args,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ})


def test_grid_survives_a_failing_job_resumes_and_reports(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    args = ("low_bit=none,bf16,fp6", "benchmark.num_prompts=4", "benchmark.concurrency=1,2",
            "benchmark.warmup_requests=1")  # fmt: skip
    first = grid(tmp_path, *args, "hydra.sweeper.keep_going_on_invalid=true", mark=mark)
    assert first.returncode == 5, first.stderr[-3000:]  # some jobs failed (here the invalid one)
    assert "1 of 3 grid jobs failed" in first.stderr
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == []
    exp = tmp_path / "grid"
    jobs = sorted(p.name for p in exp.iterdir() if p.is_dir())
    assert len(jobs) == 3, jobs
    failed = next(exp / j for j in jobs if "low_bit=fp6" in j)
    failure = json.loads((failed / "failure.json").read_text())
    assert failure["phase"] == "validate" and "fp6" in failure["error"]
    assert any(o == "low_bit=fp6" for o in failure["overrides"])
    done = [exp / j for j in jobs if "fp6" not in j]
    for job in done:
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "ok"
        # Load axes ran inside the job's one server, in order.
        assert [lvl["label"] for lvl in summary["benchmark"]["levels"]] == ["c1", "c2"]
    rows = list(csv.DictReader((exp / "summary.csv").open()))
    assert sorted((r["low_bit"], r["level"], r["status"]) for r in rows) == [
        ("", "", "failed"), ("bf16", "c1", "ok"), ("bf16", "c2", "ok"),
        ("none", "c1", "ok"), ("none", "c2", "ok"),
    ]  # fmt: skip
    for png in ("throughput.png", "ttft.png", "tpot.png"):
        assert (exp / png).stat().st_size > 1000
    assert (exp / "multirun.yaml").is_file()

    mtimes = {job: (job / "summary.json").stat().st_mtime_ns for job in done}
    started = time.monotonic()
    second = grid(tmp_path, *args, "hydra.sweeper.keep_going_on_invalid=true", mark=mark)
    assert second.returncode == 5
    assert "skipped" in second.stderr
    assert {job: (job / "summary.json").stat().st_mtime_ns for job in done} == mtimes
    assert time.monotonic() - started < 60, "resumed grid re-ran finished jobs"


def test_parallel_jobs_get_their_own_ports(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    done = grid(
        tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "engine.max_num_seqs=4,8",
        "benchmark.num_prompts=2", "benchmark.concurrency=1", "benchmark.warmup_requests=0", mark=mark,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == []
    plans = [json.loads(p.read_text()) for p in (tmp_path / "grid").glob("*/plan.json")]
    ports = {plan["argv"][plan["argv"].index("--port") + 1] for plan in plans}
    assert len(plans) == 2 and len(ports) == 2
    starts = [json.loads(p.read_text())["started_at"] for p in (tmp_path / "grid").glob("*/summary.json")]
    assert len(starts) == 2


def test_grid_on_a_local_ray_cluster(tmp_path: Path) -> None:
    """Hydra's Ray launcher, on a Ray cluster started on loopback; one job invalid on purpose."""
    done = subprocess.run(
        [sys.executable, "-m", "llmstack", "-m", "hydra/launcher=ray",
         "+hydra.launcher.ray.init._node_ip_address=127.0.0.1",
         "+hydra.launcher.ray.init.include_dashboard=false",
         "+hydra.launcher.ray.init.num_cpus=2", "device=cpu", "low_bit=none,fp6", "dry_run=true",
         "hydra.sweeper.keep_going_on_invalid=true", f"results_dir={tmp_path}", "experiment_name=ray"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 5, done.stderr[-3000:]
    assert "grid job device=cpu low_bit=fp6" in done.stderr  # found before Ray started anything
    assert "vllm.entrypoints.openai.api_server" in done.stdout + done.stderr  # the other job's dry-run plan
    assert not (tmp_path / "ray").exists()  # a dry run writes nothing


def lightweight_grid(results: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "llmstack", "-m", "engine=lightweight", "device=cpu", "engine.port=0",
        "benchmark.num_prompts=2", "benchmark.warmup_requests=0", f"results_dir={results}", *args,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def test_an_invalid_job_stops_the_grid_before_any_job_starts(tmp_path: Path) -> None:
    # Before: the valid job 2 was served and benchmarked after jobs 0 and 1 failed, exit status 2 (= the
    # number of failed jobs, read as "invalid config").
    done = lightweight_grid(tmp_path, "engine.max_batch_size=0,-1,4", "experiment_name=g")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("llmstack: grid job ") == 2
    assert "engine.max_batch_size=0: must be at least 1" in done.stderr
    assert "engine.max_batch_size=-1" in done.stderr
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_an_unnamed_grid_has_its_own_directory_and_report(tmp_path: Path) -> None:
    # Before: an unnamed grid wrote into results/<date>/ beside the day's single runs, and its summary
    # included them.
    day = tmp_path / time.strftime("%Y%m%d")
    single = day / "20260101-000000"
    single.mkdir(parents=True)
    (single / "summary.json").write_text(json.dumps({"status": "ok", "benchmark": {"levels": []}}))
    args = (
        "engine.max_batch_size=0,2,4",
        "benchmark.concurrency=1,2",
        "hydra.sweeper.keep_going_on_invalid=true",
    )
    done = lightweight_grid(tmp_path, *args)
    assert done.returncode == 5, done.stderr[-3000:]  # the invalid job failed, the valid ones ran
    assert "1 of 3 grid jobs failed" in done.stderr
    (grid_dir,) = [p for p in day.iterdir() if p.name.startswith("grid-")]
    assert grid_dir.name.startswith("grid-engine.max_batch_size-")
    rows = list(csv.DictReader((grid_dir / "summary.csv").open()))
    assert len({r["job"] for r in rows}) == 3 and "20260101-000000" not in {r["job"] for r in rows}
    invalid = next(p for p in grid_dir.iterdir() if "max_batch_size=0" in p.name)
    assert json.loads((invalid / "failure.json").read_text())["phase"] == "validate"
    listing = json.loads((grid_dir / "grid.json").read_text())
    assert len(listing["jobs"]) == 3 and "engine.max_batch_size" in listing["varied"]
