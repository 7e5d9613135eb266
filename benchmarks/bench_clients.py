"""Shared parts of the client benchmarks: the stub process, pinned client workers, CPU accounting.

Each client runs in its own long-lived worker process pinned to one CPU, so that several runs of ours and of
`vllm bench serve` can alternate without paying vLLM's 20-30 s import every time. The driver sends a worker
one JSON command per line on stdin and reads one JSON line back; everything the client itself prints
(vLLM prints a lot) goes to stderr, which the driver sends to a log file.

All client timestamps are `time.perf_counter()` seconds. On Linux that is CLOCK_MONOTONIC, the same
system-wide clock as the stub's `time.monotonic_ns()`, so client and stub times can be subtracted directly;
`check_shared_clock()` makes sure of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def check_shared_clock() -> None:
    info = time.get_clock_info("perf_counter")
    if "CLOCK_MONOTONIC" not in info.implementation or "RAW" in info.implementation:
        raise SystemExit(
            f"time.perf_counter() is {info.implementation} here, not CLOCK_MONOTONIC: client and stub "
            "timestamps cannot be compared (Linux only)"
        )


def pin(pid: int, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(pid, {cpu})


# -- stub ------------------------------------------------------------------------------------------------


@dataclass
class Stub:
    proc: subprocess.Popen[str]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> dict[str, Any]:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}


def start_stub(*args: str, cpu: int | None) -> Stub:
    command = [sys.executable, str(BENCH_DIR / "sse_stub.py"), *args]
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"stub did not start: {line!r}")
    return Stub(proc, int(line.split()[1]))


# -- CPU accounting --------------------------------------------------------------------------------------


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid` so far, in ns (schedstat: exact, not in clock ticks)."""
    total = 0
    for task in os.scandir(f"/proc/{pid}/task"):
        try:
            with open(f"{task.path}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError):
            pass
    return total


@dataclass
class CpuSampler:
    """Samples the CPU time of some processes every 20 ms; `busy(pid, t0, t1)`: their share of a window."""

    pids: list[int]
    interval_s: float = 0.02
    samples: list[tuple[float, dict[int, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), {pid: cpu_ns(pid) for pid in self.pids}))
            time.sleep(self.interval_s)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def busy(self, pid: int, t0: float, t1: float) -> float:
        """Share of one CPU that `pid` used between t0 and t1 (monotonic seconds), from the samples inside."""
        inside = [(t, s[pid]) for t, s in self.samples if t0 <= t <= t1]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return float("nan")
        (ta, ca), (tb, cb) = inside[0], inside[-1]
        return (cb - ca) / 1e9 / (tb - ta)


# -- client workers --------------------------------------------------------------------------------------


class Worker:
    """A pinned client process that runs one benchmark per command."""

    def __init__(self, kind: str, cpu: int | None, log: Path) -> None:
        self.kind = kind
        self._log = log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "bench_clients.py"), "worker", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO,
        )
        pin(self.proc.pid, cpu)
        # Wait until its imports are done: vLLM's take half a minute of CPU, on the CPU the other client
        # is measured on.
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != '{"ready": true}':
            raise RuntimeError(f"{kind} worker did not start; see {log}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker died; see {self._log.name}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.kind} worker: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


_prompt_cache: dict[tuple[int, int], list[str]] = {}
_DISTINCT_PROMPTS = 1000  # cycled: the stub does not read them, and exact-length prompts take a while to make


def _prompts(model_dir: str, count: int, input_len: int, seed: int) -> list[str]:
    key = (input_len, seed)
    if key not in _prompt_cache:
        from llmstack.bench.prompts import load_tokenizer, random_prompts

        tokenizer = load_tokenizer(model_dir)
        _prompt_cache[key] = [p.text for p in random_prompts(tokenizer, _DISTINCT_PROMPTS, input_len, seed)]
    distinct = _prompt_cache[key]
    return [distinct[i % len(distinct)] for i in range(count)]


def run_ours(cmd: dict[str, Any]) -> dict[str, Any]:
    """Closed loop with llmstack's client; the payload has the same fields as vLLM's completions request."""
    from llmstack.bench import http
    from llmstack.bench.loadgen import run_load_sync

    # For comparisons only: asyncio's transport (user-space read times) instead of kernel receive stamps.
    http._USE_KERNEL_STAMPS = cmd.get("kernel_stamps", True)

    prompts = _prompts(cmd["model_dir"], cmd["num_prompts"], cmd["input_len"], cmd.get("seed", 0))
    payloads = [
        {
            "model": "tiny",
            "prompt": text,
            "repetition_penalty": 1.0,
            "max_tokens": cmd["output_len"],
            "logprobs": None,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        for text in prompts
    ]
    options = {"endpoint": "/v1/completions", "timeout_s": 60.0, **cmd.get("options", {})}
    if cmd.get("warmup"):
        run_load_sync(cmd["url"], payloads[: cmd["warmup"]], concurrency=cmd["concurrency"], **options)
    result = run_load_sync(cmd["url"], payloads, concurrency=cmd["concurrency"], **options)
    records = result.records
    reply: dict[str, Any] = {
        "completed": sum(r.success for r in records),
        "failed": sum(not r.success for r in records),
        "duration": result.duration,
        "start": result.start,
        "end": result.end,
        "first_error": next((r.error for r in records if r.error), None),
    }
    if cmd.get("detail"):
        reply["requests"] = [
            {"sent_at": r.sent_at, "chunk_times": r.chunk_times, "text": r.output_text, "ok": r.success}
            for r in records
        ]
    return reply


def run_vllm(cmd: dict[str, Any]) -> dict[str, Any]:
    """`vllm bench serve` in this process, exactly as its console script would run it."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = [
        "--backend", "vllm",
        "--base-url", cmd["url"],
        "--endpoint", "/v1/completions",
        "--model", "tiny",
        "--tokenizer", cmd["model_dir"],
        "--dataset-name", "random",
        "--random-input-len", str(cmd["input_len"]),
        "--random-output-len", str(cmd["output_len"]),
        "--num-prompts", str(cmd["num_prompts"]),
        "--max-concurrency", str(cmd["concurrency"]),
        "--request-rate", "inf",
        "--ignore-eos",
        "--num-warmups", str(cmd.get("warmup", 0)),
        "--save-detailed",  # keeps per-request start times and texts in the returned result
        "--seed", str(cmd.get("seed", 0)),
        *cmd.get("extra_args", []),
    ]  # fmt: skip
    result = main(parser.parse_args(argv))
    starts = result["start_times"]
    ends = [s + lat for s, lat in zip(starts, result["latencies"], strict=True) if lat]
    end = max(ends)
    reply: dict[str, Any] = {
        "completed": result["completed"],
        "failed": result["failed"],
        "duration": result["duration"],
        # vLLM does not return its window; this one ends with the last response and has its duration.
        "start": end - result["duration"],
        "end": end,
        "first_error": next((e for e in result["errors"] if e), None),
    }
    if cmd.get("detail"):
        reply["requests"] = [
            {"start": s, "ttft": ttft, "itl": itl, "text": text, "ok": not err}
            for s, ttft, itl, text, err in zip(
                starts,
                result["ttfts"],
                result["itls"],
                result["generated_texts"],
                result["errors"],
                strict=True,
            )
        ]
    return reply


def run_httpx(cmd: dict[str, Any]) -> dict[str, Any]:
    """A plain httpx streaming loop (the issue's calibration point): each SSE line parsed as it comes."""
    import asyncio

    import httpx

    prompts = _prompts(cmd["model_dir"], cmd["num_prompts"], cmd["input_len"], cmd.get("seed", 0))
    url = cmd["url"] + "/v1/completions"

    async def main() -> dict[str, Any]:
        slots = cmd["concurrency"]
        limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
        async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
            pending = iter(prompts)
            ok = failed = 0

            async def worker() -> None:
                nonlocal ok, failed
                for prompt in pending:
                    payload = {
                        "model": "tiny",
                        "prompt": prompt,
                        "max_tokens": cmd["output_len"],
                        "stream": True,
                        "stream_options": {"include_usage": True},
                        "ignore_eos": True,
                    }
                    chunks = 0
                    async with client.stream("POST", url, json=payload) as response:
                        async for line in response.aiter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                event = json.loads(line[6:])
                                chunks += bool(event.get("choices"))
                    ok += chunks > 0
                    failed += chunks == 0

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(cmd["concurrency"])))
            end = time.perf_counter()
        return {"completed": ok, "failed": failed, "duration": end - start, "start": start, "end": end,
                "first_error": None}  # fmt: skip

    return asyncio.run(main())


def worker_main(kind: str) -> int:
    # Replies go to the real stdout; anything the client prints goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    runner = {"ours": run_ours, "vllm": run_vllm, "httpx": run_httpx}[kind]
    if kind == "vllm":
        import vllm.benchmarks.serve  # noqa: F401  (the slow import, once, before the first command)
    else:
        import llmstack.bench.loadgen  # noqa: F401
    replies.write('{"ready": true}\n')
    replies.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply = runner(cmd)
        except Exception as exc:  # reported to the driver, which stops
            import traceback

            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("usage: bench_clients.py worker ours|vllm|httpx  (started by the benchmarks)")
