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
    first = grid(tmp_path, *args, mark=mark)
    assert first.returncode == 1, first.stderr[-3000:]  # one job failed
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
    second = grid(tmp_path, *args, mark=mark)
    assert second.returncode == 1
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
         f"results_dir={tmp_path}", "experiment_name=ray"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    failure = json.loads((tmp_path / "ray" / "device=cpu,low_bit=fp6" / "failure.json").read_text())
    assert failure["phase"] == "validate"
    assert "vllm.entrypoints.openai.api_server" in done.stdout + done.stderr  # the other job's dry-run plan
