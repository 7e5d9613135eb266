"""Soak: many concurrent streaming clients against the lightweight worker for a long time, tiny model, CPU.

What it checks (issue 11): zero failed requests, /health answering 200 throughout, and memory that stays
flat. The worker is started through llmstack's supervisor from the composed config (`engine=lightweight
device=cpu`); --clients closed-loop clients (each on its own keep-alive connection, llmstack's load
generator) send streamed completions with usage (random prompts of --input-len tokens, --output-len output
tokens, ignore_eos) for --duration seconds. Every --sample-s seconds the resident memory of the worker's
processes (the HTTP process and the model process) is sampled and /health is asked; the slope is a
least-squares fit over the samples after the first minute (the allocator and caches settle), reported in
MiB per minute and as a share of the mean.

    .venv/bin/python benchmarks/soak_lightweight.py                       # 256 clients, 10 minutes
    .venv/bin/python benchmarks/soak_lightweight.py --clients 64 --duration 60
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.lightweight_cpu import payloads, serving  # noqa: E402
from llmstack.bench.loadgen import run_load_sync  # noqa: E402
from llmstack.models.tiny import ensure_tiny_model  # noqa: E402

SETTLE_S = 60.0


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants."""
    import psutil

    total = 0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
    except psutil.Error:
        return 0
    return total


def health(base_url: str) -> tuple[int, float]:
    """/health's status (0: no answer) and how long it took."""
    import httpx

    started = time.monotonic()
    try:
        status = httpx.get(base_url + "/health", timeout=30).status_code
    except httpx.HTTPError:
        status = 0
    return status, time.monotonic() - started


def slope_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes), in bytes per minute."""
    if len(samples) < 2:
        return 0.0
    ts = [t for t, _ in samples]
    ys = [float(y) for _, y in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 60.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/llmstack-soak"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    model = ensure_tiny_model()
    bodies = payloads(model, 512, args.input_len, args.output_len, seed=0)
    samples: list[tuple[float, int]] = []
    checks: list[tuple[int, float]] = []
    extra = ["engine.torch_threads=1"]
    with serving("lightweight", extra, args.log_dir) as base_url:
        import psutil

        worker_pid = next(
            p.pid for p in psutil.Process().children()
            if "llmstack.workers.lightweight" in " ".join(p.cmdline())
        )  # fmt: skip
        stop = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while not stop.wait(args.sample_s):
                samples.append((time.monotonic() - started, tree_rss(worker_pid)))
                checks.append(health(base_url))

        samples.append((0.0, tree_rss(worker_pid)))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        print(f"soak: {args.clients} streaming clients for {args.duration:.0f} s", flush=True)
        result = run_load_sync(
            base_url,
            bodies,
            endpoint="/v1/completions",
            concurrency=args.clients,
            duration_s=args.duration,
            timeout_s=300.0,
        )
        stop.set()
        sampler.join()
        samples.append((time.monotonic() - started, tree_rss(worker_pid)))
    ok = [r for r in result.records if r.success]
    failed = [r for r in result.records if not r.success]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    wrong_lengths = sum(r.completion_tokens != args.output_len for r in ok)
    print(f"requests: {len(result.records)} ({len(ok)} ok, {len(failed)} failed), "
          f"{len(ok) / result.duration:.1f} req/s, {tokens / result.duration:.0f} out tok/s over "
          f"{result.duration:.0f} s; outputs of the wrong length: {wrong_lengths}")  # fmt: skip
    if failed:
        errors: dict[str, int] = {}
        for r in failed:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
        print(f"errors: {errors}")
    unhealthy = [status for status, _ in checks if status != 200]
    statuses = f" {unhealthy}" if unhealthy else ""
    print(f"/health during the load: {len(checks)} checks, {len(unhealthy)} not 200{statuses}, "
          f"slowest {max((t for _, t in checks), default=0.0):.3f} s")  # fmt: skip
    mib = 1024 * 1024
    print("RSS of the worker (HTTP + model process), MiB: "
          + ", ".join(f"{t:.0f}s {rss / mib:.1f}" for t, rss in samples))  # fmt: skip
    settled = [(t, rss) for t, rss in samples if t >= SETTLE_S]
    slope = slope_per_minute(settled)
    mean = statistics.fmean(rss for _, rss in settled) if settled else 0.0
    print(f"RSS after {SETTLE_S:.0f} s: {len(settled)} samples, mean {mean / mib:.1f} MiB, "
          f"min {min(r for _, r in settled) / mib:.1f}, max {max(r for _, r in settled) / mib:.1f}; "
          f"slope {slope / mib:+.3f} MiB/min ({100 * slope / mean if mean else 0:+.3f} % of the mean per "
          "minute)" if settled else "RSS: run longer than a minute for a slope")  # fmt: skip
    return 0 if not failed and not wrong_lengths and not unhealthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
