"""benchmark=capacity through the launcher: against the capacity stub (engine=external, a latency model whose
SLO boundary is computed here) in open and closed loop, noiseless and noisy; its config errors; and against
the lightweight worker on the tiny model (integration), where a run at the capacity found meets the SLOs and
one at 1.3 x of it does not.

The stub's probes last about a second or two each, so a search takes some 10-30 s.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.capacity_stub import StubModel, percentile, stub_server

NO_DEFAULT_SLOS = ("benchmark.slo.p99_ttft_ms=null", "benchmark.slo.p99_tpot_ms=null")


def llmstack(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLMSTACK_API_KEY", "OPENAI_API_KEY")}
    return subprocess.run([sys.executable, "-m", "llmstack", *overrides], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def run_dir(results: Path) -> Path:
    (summary,) = results.rglob("summary.json")
    return summary.parent


def capacity_run(url: str, results: Path, *overrides: str) -> tuple[dict[str, Any], Path]:
    out = llmstack("engine=external", f"engine.url={url}", "benchmark=capacity", "benchmark.input_len=8",
                   "benchmark.output_len=8", "benchmark.warmup_requests=2", *NO_DEFAULT_SLOS, *overrides,
                   f"results_dir={results}")  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    where = run_dir(results)
    return json.loads((where / "summary.json").read_text())["benchmark"], where


def open_loop_boundary(model: StubModel, duration_s: float, limit_s: float, pct: float = 90) -> float:
    """The highest rate whose probe (ceil(rate x duration) evenly spaced requests) meets p<pct> TTFT <= limit
    under the stub's model: the boundary the search must find."""

    def passes(rate: float) -> bool:
        return percentile(model.open_loop_ttfts(rate, math.ceil(rate * duration_s)), pct) <= limit_s

    lo, hi = 1.0, 1000.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if passes(mid) else (lo, mid)
    return lo


def check_report(bench: dict[str, Any], where: Path) -> None:
    search = bench["search"]
    assert search["probe_count"] == len(search["probes"]) == len(list(where.glob("bench-*/result.json")))
    lines = (where / "summary.md").read_text().splitlines()
    assert lines[0].startswith(f"# Capacity: {bench['capacity']:.4g} ") and lines[0].endswith(": found")
    assert "Under the SLOs" in lines[2] and "Settings: range" in lines[3]
    assert lines[4].startswith(f"Probes: {search['probe_count']} (")
    assert (where / "capacity.png").stat().st_size > 1000
    confirm = search["probes"][-1]
    assert confirm["role"] == "confirm" and confirm["passed"] and confirm["load"] == bench["capacity"]
    assert search["request_throughput"] == confirm["request_throughput"] > 0
    assert search["mean_in_flight"] > 0 and search["output_throughput"] > 0


def test_open_loop_finds_the_stub_boundary(tmp_path: Path) -> None:
    model = StubModel(slots=4, prefill_s=0.05, token_s=0.01, output_len=8)
    boundary = open_loop_boundary(model, 1.5, 0.1)
    with stub_server(model) as stub:
        bench, where = capacity_run(
            stub.url, tmp_path, "benchmark.request_rate=[8,128]", "benchmark.burstiness=inf",
            "benchmark.duration_s=1.5", "benchmark.slo.p90_ttft_ms=100",
        )  # fmt: skip
    search = bench["search"]
    assert search["outcome"] == "found" and search["confirmed"] is True
    # Within the resolution below the model's boundary, with 3 % for what the model leaves out (the client,
    # loopback, the stub's own timer slack).
    assert boundary * 0.95 * 0.97 <= bench["capacity"] <= boundary * 1.03, (bench["capacity"], boundary)
    assert search["failed_above"] <= bench["capacity"] * 1.05
    assert search["probe_count"] <= 11
    # The probes at 64 and 128 req/s (twice the capacity and more) were stopped early, and said why.
    overloaded = [p for p in search["probes"] if p["load"] >= 60]
    assert overloaded and all(
        p["stopped_early"] and "over capacity" in p["stopped_early"] for p in overloaded
    )
    assert all(not p["passed"] for p in overloaded)
    check_report(bench, where)
    level = json.loads((where / "summary.json").read_text())["benchmark"]["levels"][0]
    assert level["label"] == "p01-r8" and level["request_rate"] == 8


def test_closed_loop_finds_the_stub_slots(tmp_path: Path) -> None:
    model = StubModel(slots=6, prefill_s=0.05, token_s=0.01, output_len=8)
    with stub_server(model) as stub:
        bench, where = capacity_run(
            stub.url, tmp_path, "benchmark.load=concurrency", "benchmark.concurrency=[1,64]",
            "benchmark.duration_s=null", "benchmark.num_prompts=36", "benchmark.slo.p99_ttft_ms=100",
        )  # fmt: skip
        assert stub.most_waiting >= 1  # probes above 6 in flight queued at the stub
    # One request more than the slots and one in seven waits a whole service time (120 ms > 100 ms).
    assert bench["capacity"] == 6 and bench["load"] == "concurrency"
    assert [p["load"] for p in bench["search"]["probes"]] == [1, 2, 4, 8, 6, 7, 6]
    check_report(bench, where)
    assert bench["search"]["max_in_flight"] == 6


def test_a_noisy_stub_still_converges(tmp_path: Path) -> None:
    model = StubModel(slots=4, prefill_s=0.05, token_s=0.01, output_len=8)
    boundary = open_loop_boundary(model, 1.5, 0.1)
    with stub_server(model, jitter=0.15, seed=3) as stub:
        bench, where = capacity_run(
            stub.url, tmp_path, "benchmark.request_rate=[8,128]", "benchmark.burstiness=inf",
            "benchmark.duration_s=1.5", "benchmark.slo.p90_ttft_ms=100", "benchmark.method=fit",
            "benchmark.probe_warmup_requests=4",
        )  # fmt: skip
    search = bench["search"]
    assert search["outcome"] == "found" and search["confirmed"] is True
    # Up to 15 % longer services make the queue start earlier than the noiseless boundary.
    assert boundary * 0.75 <= bench["capacity"] <= boundary * 1.05, (bench["capacity"], boundary)
    assert search["probe_count"] <= 14
    check_report(bench, where)
    # Each probe sent its 4 warm-up requests first, on its schedule, and measured the rest: 8 req/s x 1.5 s.
    first = json.loads((where / "bench-p01-r8" / "result.json").read_text())
    assert first["num_prompts"] == first["completed"] == 12
    assert first["duration"] == pytest.approx(1.5, abs=0.3)


def test_a_probe_without_its_warm_up_requests() -> None:
    from llmstack.bench.loadgen import LoadResult
    from llmstack.bench.records import RequestRecord
    from llmstack.phases.capacity import _without_first

    records = [RequestRecord(index=i, scheduled_at=10.0 + i, sent_at=10.1 + i) for i in range(6)]
    result = LoadResult(records, start=10.0, end=20.0, concurrency=None, request_rate=1.0, burstiness=1.0)
    kept = _without_first(result, 2)
    assert [r.index for r in kept.records] == [2, 3, 4, 5] and (kept.start, kept.end) == (12.0, 20.0)
    assert _without_first(result, 0) is result


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (NO_DEFAULT_SLOS, "benchmark.slo", "gives no SLO"),
        (("benchmark.request_rate=[8]",), "benchmark.request_rate", "[lowest, highest]"),
        (("benchmark.load=concurrency", "benchmark.concurrency=[4,2]"), "benchmark.concurrency", "lowest"),
        (("benchmark.load=rate",), "benchmark.load", "Valid choices: request_rate, concurrency"),
        (("benchmark.slo.min_goodput=0.9",), "benchmark.slo.min_goodput", "per-request limit"),
        (("benchmark.load=concurrency", "benchmark.max_concurrency=4"), "benchmark.max_concurrency", "open"),
        (("benchmark.resolution=5",), "benchmark.resolution", "fraction"),
        (("benchmark.method=newton",), "benchmark.method", "Valid choices: bisect, fit"),
        (("benchmark.stream=false",), "benchmark.slo.p99_ttft_ms", "streamed"),
    ],
)  # fmt: skip
def test_bad_search_settings_are_config_errors(tmp_path: Path, overrides: tuple[str, ...], key: str,
                                               words: str) -> None:  # fmt: skip
    out = llmstack("engine=lightweight", "model=tiny", "benchmark=capacity", *overrides, "dry_run=true",
                   f"results_dir={tmp_path}")  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"Invalid config: {key}=" in out.stderr and words in out.stderr, out.stderr
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.integration
def test_lightweight_worker_capacity_holds_and_1_3x_does_not(tmp_path: Path) -> None:
    # Closed loop against a batch of 4: a fifth request in flight waits for a whole 512-token answer
    # (~250 ms) before its first token, far past the 50 ms limit; four never wait. A sharp boundary on a
    # busy CPU, where rates drift.
    common = ("engine=lightweight", "model=tiny", "device=cpu", "engine.max_batch_size=4",
              "benchmark=capacity", "benchmark.load=concurrency", "benchmark.duration_s=2",
              "benchmark.input_len=64", "benchmark.output_len=512", "benchmark.warmup_requests=4",
              *NO_DEFAULT_SLOS, "benchmark.slo.p90_ttft_ms=50")  # fmt: skip
    out = llmstack(*common, "benchmark.concurrency=[1,16]", f"results_dir={tmp_path / 'search'}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    bench = json.loads((run_dir(tmp_path / "search") / "summary.json").read_text())["benchmark"]
    capacity = bench["capacity"]
    assert bench["search"]["outcome"] == "found" and bench["search"]["confirmed"] is True
    assert capacity == 4, bench["search"]["probes"]
    # The confirm runs: one probe at the capacity, one at 1.3 x (rounded up to whole requests).
    over = math.ceil(1.3 * capacity)
    out = llmstack(*common, f"benchmark.concurrency=[{capacity},{over}]",
                   f"benchmark.growth={over / capacity}", "benchmark.max_probes=2", "benchmark.confirm=false",
                   f"results_dir={tmp_path / 'confirm'}")  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    probes = json.loads((run_dir(tmp_path / "confirm") / "summary.json").read_text())["benchmark"]["search"]
    (at, above) = probes["probes"]
    assert (at["load"], at["passed"]) == (capacity, True), at
    assert (above["load"], above["passed"]) == (over, False), above
    assert any("p90_ttft_ms" in reason for reason in above["failed"])
