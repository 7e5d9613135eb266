"""Probes to converge: the capacity search (bisect, fit) vs a linear sweep at the same resolution over the
same range (issue 16's Performance target: >= 3x fewer probes).

Counts, not seconds: every probe is the capacity stub's latency model (tests/capacity_stub.py's StubModel:
`slots` FIFO service slots, deterministic prefill and per-token times), evaluated for the probe's requests,
so a count is exactly what the stub server would give without the client's noise. The sweep probes
low, low x (1 + resolution), ... (whole numbers in closed loop: every one while +1 is finer) until the first
failure: the cheapest sweep that brackets the boundary as finely as the search does.

    .venv/bin/python benchmarks/capacity_probes.py                 # counts (a second)
    .venv/bin/python benchmarks/capacity_probes.py --live-stub     # and one search through the launcher
    .venv/bin/python benchmarks/capacity_probes.py --lightweight   # and its wall time on the tiny model
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmstack.phases.capacity_search import SearchSettings, Verdict, linear_sweep, search  # noqa: E402
from tests.capacity_stub import StubModel, percentile, stub_server  # noqa: E402

LIMIT_S = 0.1  # p90 TTFT <= 100 ms (open loop), p99 TTFT <= 100 ms (closed loop)
REQUESTS = 60


def open_probe(model: StubModel):
    def probe(rate: float, role: str) -> Verdict:
        p90 = percentile(model.open_loop_ttfts(rate, REQUESTS), 90)
        return Verdict(p90 <= LIMIT_S, p90 / LIMIT_S)

    return probe


def closed_probe(model: StubModel):
    def probe(concurrency: float, role: str) -> Verdict:
        # Enough requests for every client to send a few (the online phase's num_prompts would be raised too).
        n = max(REQUESTS, 4 * int(concurrency))
        p99 = percentile(model.closed_loop_ttfts(int(concurrency), n), 99)
        return Verdict(p99 <= LIMIT_S, p99 / LIMIT_S)

    return probe


OPEN_SLOTS = (1, 2, 3, 4, 6, 8, 12, 16, 24)  # 8-245 req/s: inside the range
CLOSED_SLOTS = (2, 4, 8, 16, 32, 64, 128, 200)


def counts(resolution: float) -> list[dict[str, object]]:
    rows = []
    cases = [("open", slots, False) for slots in OPEN_SLOTS] + [("closed", s, True) for s in CLOSED_SLOTS]
    for loop, slots, integer in cases:
        model = StubModel(slots=slots, prefill_s=0.05, token_s=0.01, output_len=8)
        probe = closed_probe(model) if integer else open_probe(model)
        settings = SearchSettings(low=1, high=256, resolution=resolution, integer=integer)
        swept = linear_sweep(probe, settings)
        row: dict[str, object] = {"loop": loop, "slots": slots, "sweep": len(swept.probes)}
        for method in ("bisect", "fit"):
            found = search(probe, SearchSettings(**{**settings.__dict__, "method": method}))
            row[method] = len(found.probes)
            row[f"{method}_capacity"] = found.capacity
        rows.append(row)
    return rows


def live_stub() -> dict[str, object]:
    """One open-loop search through the launcher against the stub server (4 slots): probes and wall time."""
    model = StubModel(slots=4, prefill_s=0.05, token_s=0.01, output_len=8)
    with stub_server(model) as stub, tempfile.TemporaryDirectory() as results:
        return _launch(["engine=external", f"engine.url={stub.url}", "benchmark.input_len=8",
                        "benchmark.output_len=8", "benchmark.request_rate=[8,128]",
                        "benchmark.burstiness=inf", "benchmark.duration_s=1.5",
                        "benchmark.slo.p90_ttft_ms=100"], results)  # fmt: skip


def lightweight() -> dict[str, object]:
    """The closed-loop search of tests/test_capacity_phase.py on the lightweight worker (tiny model, CPU)."""
    with tempfile.TemporaryDirectory() as results:
        return _launch(["engine=lightweight", "model=tiny", "device=cpu", "engine.max_batch_size=4",
                        "benchmark.load=concurrency", "benchmark.concurrency=[1,16]",
                        "benchmark.duration_s=2", "benchmark.input_len=64", "benchmark.output_len=512",
                        "benchmark.warmup_requests=4", "benchmark.slo.p90_ttft_ms=50"], results)  # fmt: skip


def _launch(overrides: list[str], results: str) -> dict[str, object]:
    command = [sys.executable, "-m", "llmstack", "benchmark=capacity", "benchmark.slo.p99_ttft_ms=null",
               "benchmark.slo.p99_tpot_ms=null", *overrides, f"results_dir={results}"]  # fmt: skip
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"the search failed ({out.returncode}): {out.stderr[-2000:]}")
    (summary,) = Path(results).rglob("summary.json")
    bench = json.loads(summary.read_text())["benchmark"]
    search_record = bench["search"]
    stopped = sum(p["stopped_early"] is not None for p in search_record["probes"])
    return {"capacity": bench["capacity"], "probes": search_record["probe_count"],
            "by_role": search_record["probes_by_role"], "wall_s": round(wall, 1),
            "stopped_early": stopped}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=float, default=0.05)
    parser.add_argument("--live-stub", action="store_true")
    parser.add_argument("--lightweight", action="store_true")
    args = parser.parse_args()
    rows = counts(args.resolution)
    print(f"range [1, 256], growth 2, resolution {args.resolution:.0%}; probes to converge, confirm included")
    header = ("loop", "slots", "capacity", "sweep", "bisect", "fit", "sweep/bisect")
    print(f"{header[0]:6} " + " ".join(f"{h:>8}" for h in header[1:]))
    for row in rows:
        capacity = row["bisect_capacity"]
        cells = [row["slots"], f"{capacity:.4g}" if capacity is not None else "-", row["sweep"],
                 row["bisect"], row["fit"], f"{row['sweep'] / row['bisect']:.1f}"]  # fmt: skip
        print(f"{row['loop']:6} " + " ".join(f"{c:>8}" for c in cells))
    for loop in ("open", "closed"):
        mine = [r for r in rows if r["loop"] == loop]
        ratios = [r["sweep"] / r["bisect"] for r in mine]
        means = {k: statistics.mean(r[k] for r in mine) for k in ("bisect", "fit", "sweep")}
        print(
            f"{loop} loop: sweep/bisect median {statistics.median(ratios):.1f}x (min {min(ratios):.1f}x); "
            f"mean probes: bisect {means['bisect']:.1f}, fit {means['fit']:.1f}, sweep {means['sweep']:.1f}"
        )
    if args.live_stub:
        print("live, stub server (4 slots, open loop, 1.5 s probes):", live_stub())
    if args.lightweight:
        print("live, lightweight worker (tiny, CPU, closed loop, 2 s probes):", lightweight())


if __name__ == "__main__":
    main()
