"""Server-settings searches: a grid (`-m`) of `benchmark=capacity` jobs, where the settings validation refuses
are pruned (counted, with their reasons, never launched, not a failure), the best setting per device is
written as a profile that composes, and summary.md and pareto.png report the search.

The cheap search is engine=vllm through everything real (the grid, vLLM's validation and memory fit, its
plan, the supervisor, the capacity phase) with the capacity stub serving in vLLM's place
(tests/vllm_stub.py: max_num_seqs service slots, so the capacity each setting must find is known). The
integration one runs the lightweight worker on the tiny model at two batch sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmstack.models.tiny import ensure_tiny_model
from tests.procs import wait_no_processes
from tests.vllm_stub import fake_vllm_python

ROOT = Path(__file__).resolve().parent.parent
NO_DEFAULT_SLOS = ("benchmark.slo.p99_ttft_ms=null", "benchmark.slo.p99_tpot_ms=null")


def llmstack(*args: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLMSTACK_API_KEY", "OPENAI_API_KEY")}
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "llmstack", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)  # fmt: skip


def summaries(grid: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in grid.glob("*/summary.json")}


def search_args(tmp_path: Path) -> list[str]:
    # The memory fit reads the model's shape from its config.json: the tiny model must exist when the grid
    # checks its jobs (else the fit is left to each job's own start: test_settings_refused_at_their_start).
    ensure_tiny_model()
    python = fake_vllm_python(tmp_path)
    # device.memory_gib 0.0015: one 256-token sequence of the tiny model fits, one of 1024 does not.
    return ["-m", "engine=vllm", "model=tiny", "device=cpu", "device.memory_gib=0.0015",
            f"engine.python={python}", "engine.port=0", "engine.max_num_seqs=2,4",
            "engine.max_model_len=256,1024", "benchmark=capacity", "benchmark.load=concurrency",
            "benchmark.concurrency=[1,8]", "benchmark.duration_s=null", "benchmark.num_prompts=16",
            "benchmark.input_len=8", "benchmark.output_len=8", "benchmark.warmup_requests=2",
            *NO_DEFAULT_SLOS, "benchmark.slo.p99_ttft_ms=100", f"results_dir={tmp_path / 'results'}",
            "experiment_name=search"]  # fmt: skip


def test_a_settings_search_prunes_what_cannot_fit_and_writes_the_best_as_a_profile(tmp_path: Path) -> None:
    args = search_args(tmp_path)
    first = llmstack(*args)
    # Pruned settings are no failure of the grid.
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "2 of 4 settings pruned before the search (refused by validation); 2 to search" in first.stderr
    assert first.stderr.count("pruned, never launched: Invalid config: engine.max_model_len=1024") == 2
    grid = tmp_path / "results" / "search"
    listing = json.loads((grid / "grid.json").read_text())
    assert listing["search"] == "capacity" and len(listing["jobs"]) == 4
    assert all(job["devices"] == 1 for job in listing["jobs"])
    assert len(listing["pruned"]) == 2
    overrides = {job["name"]: job["overrides"] for job in listing["jobs"]}
    assert all("engine.max_model_len=1024" in overrides[name] for name in listing["pruned"])
    assert all("vLLM would refuse to start" in reason for reason in listing["pruned"].values())
    # Never launched: no directory of their own. The others ran and found their slots exactly.
    assert not any((grid / name).exists() for name in listing["pruned"])
    ran = summaries(grid)
    assert len(ran) == 2 and all("engine.max_model_len=256" in overrides[name] for name in ran)
    capacity = {next(o for o in overrides[name] if "max_num_seqs" in o): s["benchmark"]["capacity"]
                for name, s in ran.items()}  # fmt: skip
    assert capacity == {"engine.max_num_seqs=2": 2, "engine.max_num_seqs=4": 4}, capacity
    probes = sum(s["benchmark"]["search"]["probe_count"] for s in ran.values())

    lines = (grid / "summary.md").read_text().splitlines()
    assert lines[0] == (
        "# Capacity search search: 4 requests in flight per device with engine.max_num_seqs=4, "
        "engine.max_model_len=256 (closed loop, benchmark.concurrency)"
    )
    assert lines[2] == "Under the SLOs p99_ttft_ms <= 100 (latencies in ms; no request may fail)."
    assert lines[3].startswith("Best setting: engine.max_num_seqs=4, engine.max_model_len=256: capacity 4 ")
    assert lines[4].startswith(
        f"Profile: {grid / 'profile' / 'best.yaml'}; serve with it: python -m llmstack"
    )
    assert lines[5] == (f"Took 2 jobs (2 ok) and {probes} probes; 2 of 4 settings pruned "
                        "(refused by validation, never launched).")  # fmt: skip
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| engine.max_num_seqs | engine.max_model_len | status | capacity")
    assert table[1].startswith("| 4 | 256 | ok | 4 | 1 | 4 |") and table[2].startswith("| 2 | 256 | ok | 2 |")
    assert sum("| pruned |" in row and "engine.max_model_len=1024" in row for row in table) == 2
    assert (grid / "pareto.png").stat().st_size > 1000

    profile = (grid / "profile" / "best.yaml").read_text()
    assert profile.startswith("# @package _global_\n")
    tuned = [line for line in profile.splitlines() if "# tuned" in line]
    assert [line.split("#")[0].strip() for line in tuned] == ["max_num_seqs: 4", "max_model_len: 256"]
    for line in tuned:  # each tuned value says where it comes from
        for fact in ("search search", "2026", "device=cpu x1", "model=tiny", "SLOs p99_ttft_ms <= 100",
                     "capacity 4"):  # fmt: skip
            assert fact in line, (fact, line)
    assert "256 -> 4, 1024 -> pruned" in tuned[1] and "2 -> 2, 4 -> 4" in tuned[0]
    keys = [line.split(":")[0].strip() for line in profile.split("defaults:")[1].splitlines()[1:] if line
            and not line.lstrip().startswith("-")]  # fmt: skip
    assert keys == ["device", "memory_gib", "engine", "python", "max_num_seqs", "max_model_len"], keys
    # The command the report gives composes, validates and plans the tuned values.
    serve = lines[4].split("serve with it: ")[1].split()
    assert serve[:3] == ["python", "-m", "llmstack"]
    dry = llmstack(*serve[3:], "dry_run=true")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "--max-num-seqs 4" in dry.stdout and "--max-model-len 256" in dry.stdout
    assert f"{tmp_path / 'python'} -m vllm.entrypoints.openai.api_server" in dry.stdout

    # Resumed like any grid: the finished jobs are skipped, the pruned ones pruned again, the report the same.
    mtimes = {p: p.stat().st_mtime_ns for p in grid.glob("*/summary.json")}
    again = llmstack(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done before, skipped") == 2
    assert "2 of 4 settings pruned" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in grid.glob("*/summary.json")} == mtimes
    assert (grid / "summary.md").read_text().splitlines()[:6] == lines[:6]


def test_settings_refused_at_their_start_are_pruned_too(tmp_path: Path) -> None:
    # A cache without the tiny model: its shape is unknown when the grid checks the jobs, so the memory fit
    # refuses max_model_len=1024 only at each job's own start, after the first job generated the model.
    done = llmstack(*search_args(tmp_path), LLMSTACK_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "settings pruned before the search" not in done.stderr
    assert "2 more settings pruned at their start (refused by validation, never launched)" in done.stderr
    grid = tmp_path / "results" / "search"
    lines = (grid / "summary.md").read_text().splitlines()
    assert lines[5].endswith("2 of 4 settings pruned (refused by validation, never launched).")
    assert lines[5].startswith("Took 2 jobs (2 ok) and ")
    assert sum("| pruned |" in line and "at its start: Invalid config: engine.max_model_len=1024" in line
               for line in lines) == 2  # fmt: skip
    assert "max_num_seqs: 4  # tuned" in (grid / "profile" / "best.yaml").read_text()


def test_a_search_whose_every_setting_is_refused_starts_nothing(tmp_path: Path) -> None:
    args = [a if not a.startswith("engine.max_model_len=") else "engine.max_model_len=1024,2048"
            for a in search_args(tmp_path)]  # fmt: skip
    done = llmstack(*args)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "4 of 4 grid jobs are invalid, so none was started" in done.stderr
    assert not (tmp_path / "results").exists()


def test_a_grid_of_other_benchmarks_still_fails_on_invalid_jobs(tmp_path: Path) -> None:
    args = [a for a in search_args(tmp_path) if not a.startswith("benchmark")]
    done = llmstack(*args, "benchmark=smoke", "dry_run=true")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "2 of 4 grid jobs are invalid, so none was started" in done.stderr
    assert "pruned" not in done.stderr


@pytest.mark.integration
def test_lightweight_batch_sizes_the_larger_wins_and_is_the_profile(tmp_path: Path) -> None:
    # Closed loop against batches of 2 and 4: a request beyond the batch waits for a whole 512-token answer
    # (~250 ms) before its first token, far past 50 ms (tests/test_capacity_phase.py: capacity 4 at 4).
    mark = f"LLMSTACK_TEST_MARK={tmp_path.name}"
    args = ["-m", "engine=lightweight", "model=tiny", "device=cpu", "engine.port=0",
            "engine.max_batch_size=2,4", "benchmark=capacity", "benchmark.load=concurrency",
            "benchmark.concurrency=[1,16]",
            "benchmark.duration_s=2", "benchmark.input_len=64", "benchmark.output_len=512",
            "benchmark.warmup_requests=4", *NO_DEFAULT_SLOS, "benchmark.slo.p90_ttft_ms=50",
            f"+engine.extra_env.{mark}", f"results_dir={tmp_path}", "experiment_name=batch"]  # fmt: skip
    done = llmstack(*args, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert wait_no_processes(mark, timeout=10) == []
    grid = tmp_path / "batch"
    listing = json.loads((grid / "grid.json").read_text())
    batch = {
        job["name"]: next(o for o in job["overrides"] if "max_batch_size" in o) for job in listing["jobs"]
    }
    found = {batch[name]: s["benchmark"]["capacity"] for name, s in summaries(grid).items()}
    assert found == {"engine.max_batch_size=2": 2, "engine.max_batch_size=4": 4}, found
    lines = (grid / "summary.md").read_text().splitlines()
    assert lines[0].startswith("# Capacity search batch: 4 requests in flight per device with "
                               "engine.max_batch_size=4 ")  # fmt: skip
    assert "0 of 2 settings pruned" in lines[5]
    profile = (grid / "profile" / "best.yaml").read_text()
    (tuned,) = [line for line in profile.splitlines() if "# tuned" in line]
    assert tuned.startswith("  max_batch_size: 4  # tuned: capacity 4 ") and "2 -> 2, 4 -> 4" in tuned
    assert "  - override /engine: lightweight" in profile
    dry = llmstack("--config-dir", str(grid), "profile=best", "model=tiny", "dry_run=true")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "--max-batch-size 4" in dry.stdout
    assert (grid / "pareto.png").stat().st_size > 1000


def test_which_settings_are_pruned() -> None:
    from llmstack.grid_sweep import PlannedJob, SweepPlan

    def plan(*jobs: PlannedJob) -> SweepPlan:
        return SweepPlan(Path("/nonexistent"), False, list(jobs))

    ok = PlannedJob(["a=1"], "a=1", capacity=True, devices=1)
    refused = PlannedJob(["a=2"], "a=2", "Invalid config: a=2: too big.", refused=True, capacity=True)
    typo = PlannedJob(["a=x"], "a=x", "Could not override 'a'", refused=False, capacity=None)
    searched = plan(ok, refused)
    assert (
        searched.search
        and searched.pruned == [refused]
        and searched.invalid == []
        and searched.runnable == [ok]
    )
    # A command error (Hydra's, not validation's) is invalid as in any grid.
    assert plan(ok, refused, typo).invalid == [typo] and plan(ok, refused, typo).pruned == [refused]
    # Nothing left to search: the command is wrong, every refused job is invalid.
    assert plan(refused).pruned == [] and plan(refused).invalid == [refused]
    # Not a capacity search: refused jobs are invalid jobs.
    smoke = [PlannedJob(j.overrides, j.name, j.error, j.refused, False, j.devices) for j in (ok, refused)]
    assert not plan(*smoke).search and plan(*smoke).invalid == [smoke[1]]


def _job(grid: Path, name: str, capacity: float | None, outcome: str, probes: list[dict]) -> None:
    (grid / name).mkdir(parents=True)
    search = {"outcome": outcome, "load": "request_rate", "capacity": capacity, "slo": ["p99_ttft_ms <= 500"],
              "probe_count": len(probes), "probes": probes,
              "output_throughput": probes[-1]["output_throughput"] if probes else None}  # fmt: skip
    summary = {"status": "ok", "model": "llama3_8b", "engine": "vllm-upstream", "low_bit": "fp8",
               "device": "xpu", "started_at": "2026-12-01T10:00:00+0000",
               "benchmark": {"capacity": capacity, "load": "request_rate", "search": search}}  # fmt: skip
    (grid / name / "summary.json").write_text(json.dumps(summary))
    (grid / name / "config.yaml").write_text("device:\n  name: xpu\n  count: 2\n  product: B60\n")


def test_capacity_per_device_ranks_the_settings(tmp_path: Path) -> None:
    from llmstack.report import build_report

    grid = tmp_path / "tp"
    probe = {
        "label": "p01-r4",
        "load": 4.0,
        "passed": True,
        "output_throughput": 400.0,
        "mean_in_flight": 8.0,
    }
    over = {**probe, "label": "p02-r8", "load": 8.0, "passed": False, "output_throughput": 500.0}
    _job(grid, "tp1", 6.0, "found", [probe, over])
    _job(grid, "tp2", 10.0, "at_least", [{**probe, "output_throughput": 900.0}])
    (grid / "tp4").mkdir()
    (grid / "tp4" / "failure.json").write_text(json.dumps({"phase": "run", "error": "engine died"}))
    jobs = [{"name": f"tp{n}", "overrides": ["profile=arc_pro_b60x4", f"engine.tensor_parallel_size={n}",
                                            "engine.port=0", "benchmark=capacity"], "devices": n}
            for n in (1, 2, 4, 8)]  # fmt: skip
    listing = {
        "jobs": jobs,
        "varied": ["engine.tensor_parallel_size"],
        "search": "capacity",
        "pruned": {"tp8": "Invalid config: engine.tensor_parallel_size=8: more than device.count=4."},
    }
    (grid / "grid.json").write_text(json.dumps(listing))
    build_report(grid)
    lines = (grid / "summary.md").read_text().splitlines()
    # 6 req/s on one card beats 10 on two.
    assert lines[0] == ("# Capacity search tp: 6 requests/s per device with engine.tensor_parallel_size=1 "
                        "(open loop, benchmark.request_rate)")  # fmt: skip
    assert lines[2] == "Under the SLOs p99_ttft_ms <= 500 (latencies in ms; no request may fail)."
    assert lines[5] == ("Took 3 jobs (2 ok, 1 failed) and 3 probes; 1 of 4 settings pruned (refused by "
                        "validation, never launched).")  # fmt: skip
    rows = [line for line in lines if line.startswith("| ")][1:]
    assert [row.split(" | ")[:4] for row in rows] == [
        ["| 1", "ok", "6", "1"], ["| 2", "ok", "10", "2"], ["| 4", "failed", "-", "4"],
        ["| 8", "pruned", "-", "8"],
    ]  # fmt: skip
    assert "| 5 | 450 |" in rows[1] and "engine died" in rows[2] and "more than device.count=4" in rows[3]
    assert (grid / "pareto.png").stat().st_size > 1000
    profile = (grid / "profile" / "best.yaml").read_text()
    assert ("  tensor_parallel_size: 1  # tuned: capacity 6 (6 per device); best per device at each value "
            "tried: 1 -> 6, 2 -> 5, 4 -> failed, 8 -> pruned; search tp, 2026-12-01, device=xpu x2 (B60), "
            "model=llama3_8b, SLOs p99_ttft_ms <= 500") in profile  # fmt: skip
    assert "port" not in profile.split("defaults:")[1]
    # The profile the jobs ran with comes first, then this one's values on top.
    assert profile.split("defaults:\n")[1].startswith(
        "  - /profile/arc_pro_b60x4@_here_  # the jobs' (not tuned)"
    )
    dry = llmstack("--config-dir", str(grid), "profile=best", "model=llama3_8b", "dry_run=true")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "--tensor-parallel-size 1" in dry.stdout and "device=xpu" in dry.stdout


def test_a_search_whose_best_passed_the_top_of_its_range_says_at_least(tmp_path: Path) -> None:
    from llmstack.report import build_report

    grid = tmp_path / "g"
    _job(grid, "a", 64.0, "at_least", [{"label": "p01-r64", "load": 64.0, "passed": True,
                                         "output_throughput": 10.0, "mean_in_flight": 2.0}])  # fmt: skip
    listing = {"jobs": [{"name": "a", "overrides": ["engine.max_num_seqs=8"], "devices": 1}],
               "varied": [], "search": "capacity", "pruned": {}}  # fmt: skip
    (grid / "grid.json").write_text(json.dumps(listing))
    build_report(grid)
    assert (
        (grid / "summary.md").read_text().startswith("# Capacity search g: at least 64 requests/s per device")
    )
