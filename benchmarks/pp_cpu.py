"""CPU, compute-bound model: 2-rank pipeline parallelism (engine=pp) against the lightweight worker.

Targets (issue 14, "Performance"): each stage busy >= 80 % of the measured window, and PP output tokens/s
>= 1.3x the lightweight worker's, closed loop at concurrency 16, the two measured alternately in one run.

Model: the tiny recipe widened until compute dominates (hidden 1024, intermediate 2816, 8 layers, 16 heads,
float32, the tiny tokenizer; `ensure_tiny_model(shape=...)`).
Servers, each started once and kept for every round, straight from their module command lines:
  A  lightweight: `python -m llmstack.workers.lightweight --max-batch-size 16` (its default torch threads:
     one on this 2-core box, model loop in its own process);
  B  pp: `python -m llmstack.workers.pipeline.torchrun --standalone --nnodes=1 --nproc-per-node=2
     -m llmstack.workers.pipeline --pipeline-parallel-size 2 --torch-threads 1 --max-batch-size 8`
     (8 per micro-batch, 2 micro-batches: 16 in flight).
Both get the same --max-model-len (KV cache sized alike, and small). The server not being measured sits idle;
its process tree's CPU is read during every window of the other (psutil) and reported: idle ranks must not
spin. Load: llmstack's load generator (`run_load_sync`), streamed `/v1/completions`, prompts of --input-len
tokens made with the model's tokenizer, --output-len output tokens (max_tokens = min_tokens, ignore_eos,
temperature 0), closed loop at --concurrency; the output tokens of every response's `usage` must add up.
Each server gets one unrecorded warm-up load, then the rounds alternate the order (A B, B A, A B, ...).
PP's stage busy fractions: the delta of `llmstack:pipeline_stage_busy_seconds_total{stage}` from /metrics
(read before the window and after it, once the pipeline is idle and its figures final) over the window's
wall time. A stage's busy time is the wall time of its forwards, so a core taken by another process
inflates it: the CPU seconds each process used in the window are printed beside it.

    flock /tmp/llmstack-heavy.lock .venv/bin/python benchmarks/pp_cpu.py            # --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmstack.bench.loadgen import run_load_sync  # noqa: E402
from llmstack.bench.metrics import summarize_load  # noqa: E402
from llmstack.bench.prompts import load_tokenizer, random_prompts  # noqa: E402
from llmstack.models.tiny import Shape, ensure_tiny_model  # noqa: E402
from tests.procs import free_port  # noqa: E402

SHAPE = Shape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
              num_key_value_heads=16)  # fmt: skip
NAME = "m"
BUSY = "llmstack:pipeline_stage_busy_seconds_total"
IN_FLIGHT = "llmstack:pipeline_micro_batches_in_flight"
STEPS = "llmstack:pipeline_steps_total"


def server_argv(kind: str, model_dir: Path, port: int, args: argparse.Namespace) -> list[str]:
    common = ["--model", str(model_dir), "--served-model-name", NAME, "--port", str(port),
              "--max-model-len", str(args.max_model_len), "--log-level", args.log_level]  # fmt: skip
    py = sys.executable
    if kind == "lightweight":
        return [py, "-m", "llmstack.workers.lightweight", *common, "--max-batch-size", str(args.concurrency)]
    return [
        py, "-m", "llmstack.workers.pipeline.torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=2",
        "-m", "llmstack.workers.pipeline", *common, "--pipeline-parallel-size", "2", "--torch-threads", "1",
        "--max-batch-size", str(args.concurrency // 2), "--prefill-chunk", str(args.prefill_chunk),
    ]  # fmt: skip


class Server:
    """One worker's process tree, started in its own session, stopped by SIGTERM (then SIGKILL) to that."""

    def __init__(self, kind: str, argv: list[str], port: int, log: Path) -> None:
        self.kind, self.port, self.log = kind, port, log
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        import httpx

        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.kind} not ready in {timeout_s:g} s; see {self.log}")

    def processes(self) -> list[Any]:
        import psutil

        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def cpu_seconds(procs: list[Any]) -> dict[int, float]:
    """user + system CPU seconds of each process (and its reaped children), by pid."""
    out: dict[int, float] = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system + t.children_user + t.children_system
        except Exception:  # gone: counts as nothing more
            out[p.pid] = 0.0
    return out


def label(p: Any) -> str:
    """A short role name for a worker process (what each one is in the tree)."""
    try:
        cmd = " ".join(p.cmdline())
        env_rank = p.environ().get("RANK")
    except Exception:
        return f"pid {p.pid}"
    if "resource_tracker" in cmd:
        return "resource tracker"
    if "spawn_main" in cmd:
        return "rank0 model" if env_rank == "0" else "model process"
    if "pipeline.torchrun" in cmd:
        return "torchrun agent"
    if "llmstack.workers.pipeline" in cmd:
        return f"rank{env_rank} front" if env_rank == "0" else f"rank{env_rank}"
    return "front end"


def scrape(url: str, client: Any = None) -> dict[str, Any]:
    """The pipeline's figures from /metrics. Pass a client where it is called often: each `httpx.get` builds
    an SSL context, about 40 ms of CPU, which at 4 reads a second took 0.1-0.16 cores from the ranks."""
    import httpx

    busy: dict[int, float] = {}
    figures: dict[str, Any] = {"busy": busy}
    text = (client.get(f"{url}/metrics") if client else httpx.get(f"{url}/metrics", timeout=10)).text
    for line in text.splitlines():
        if line.startswith(BUSY + "{"):
            stage = int(line.split('stage="')[1].split('"')[0])
            busy[stage] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(IN_FLIGHT + "{"):
            figures["in_flight"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(STEPS + "{"):
            figures["steps"] = float(line.rsplit(" ", 1)[1])
    return figures


def settled(url: str) -> dict[str, Any]:
    """/metrics once the pipeline is idle: the scheduler publishes its final figures when it goes idle, and
    the other stages' busy time as of their last returned step, so wait until two reads agree."""
    last = scrape(url)
    for _ in range(40):
        time.sleep(0.6)
        now = scrape(url)
        if now == last and now.get("in_flight", 0) == 0:
            return now
        last = now
    return last


def payloads(model_dir: Path, count: int, input_len: int, output_len: int, seed: int) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(model_dir)
    return [
        {
            "model": NAME,
            "prompt": p.text,
            "max_tokens": output_len,
            "min_tokens": output_len,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for p in random_prompts(tokenizer, count, input_len, seed)
    ]


def measure(
    server: Server, idle: Server | None, requests: list[dict[str, Any]], concurrency: int
) -> dict[str, Any]:
    import psutil

    pp = server.kind == "pp"
    before = settled(server.url) if pp else {}
    procs = server.processes()
    idle_procs = idle.processes() if idle else []
    me = psutil.Process()
    cpu0, idle0, me0 = cpu_seconds(procs), cpu_seconds(idle_procs), cpu_seconds([me])
    system0 = psutil.cpu_times()
    # The in-flight gauge, sampled through the window as often as the scheduler publishes it (0.5 s).
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        import httpx

        with httpx.Client(timeout=10) as client:
            while not done.wait(0.5):
                with contextlib.suppress(Exception):
                    samples.append(scrape(server.url, client).get("in_flight", 0.0))

    sampler = threading.Thread(target=sample, daemon=True)
    if pp:
        sampler.start()
    started = time.perf_counter()
    result = run_load_sync(server.url, requests, endpoint="/v1/completions", concurrency=concurrency,
                           timeout_s=900)  # fmt: skip
    wall = time.perf_counter() - started
    done.set()
    cpu1, idle1, me1 = cpu_seconds(procs), cpu_seconds(idle_procs), cpu_seconds([me])
    system1 = psutil.cpu_times()
    if pp:
        sampler.join()
    summary = summarize_load(result)
    if summary["failed"]:
        raise RuntimeError(
            f"{server.kind}: {summary['failed']} requests failed: {summary.get('error_counts')}"
        )
    tokens = sum(r.completion_tokens or 0 for r in result.records)
    expected = len(requests) * requests[0]["max_tokens"]
    if tokens != expected:
        raise RuntimeError(f"{server.kind}: usage says {tokens} output tokens, expected {expected}")
    busy_all = (system1.user + system1.system + system1.nice) - (system0.user + system0.system + system0.nice)
    ours = (
        sum(cpu1[p] - cpu0[p] for p in cpu1)
        + sum(idle1[p] - idle0[p] for p in idle1)
        + me1[me.pid]
        - me0[me.pid]
    )
    figures: dict[str, Any] = {
        "output_tok_s": tokens / wall,
        "client_output_tok_s": summary["output_throughput"],
        "mean_ttft_ms": summary["mean_ttft_ms"],
        "mean_tpot_ms": summary["mean_tpot_ms"],
        "wall_s": wall,
        "requests": len(requests),
        # CPU seconds per process of the measured server, per second of the window (1.0 = one core).
        "cpu": {label(p): (cpu1[p.pid] - cpu0[p.pid]) / wall for p in procs},
        "client_cpu": (me1[me.pid] - me0[me.pid]) / wall,
        "idle_server_cpu": sum(idle1[p] - idle0[p] for p in idle1) / wall if idle else None,
        # Cores used by everything else on the machine (other engineers' tests), for the noise.
        "others_cpu": max(0.0, busy_all - ours) / wall,
    }
    if pp:
        after = settled(server.url)
        figures["busy"] = [(after["busy"][s] - before["busy"][s]) / wall for s in sorted(after["busy"])]
        figures["steps"] = after["steps"] - before["steps"]
        figures["in_flight_mean"] = statistics.fmean(samples) if samples else None
        figures["in_flight_hist"] = {str(v): samples.count(v) for v in sorted(set(samples))}
    return figures


def idle_cpu(server: Server, seconds: float) -> dict[str, float]:
    procs = server.processes()
    a = cpu_seconds(procs)
    time.sleep(seconds)
    b = cpu_seconds(procs)
    return {label(p): (b[p.pid] - a[p.pid]) / seconds for p in procs}


def describe(f: dict[str, Any]) -> str:
    line = (f"{f['output_tok_s']:7.1f} out tok/s  ttft {f['mean_ttft_ms']:7.0f} ms"
            f"  tpot {f['mean_tpot_ms']:6.1f} ms  ({f['requests']} req, {f['wall_s']:.1f} s)")  # fmt: skip
    if "busy" in f:
        line += "  busy " + " ".join(f"s{i}={b:.0%}" for i, b in enumerate(f["busy"]))
        line += f"  in-flight mean {f['in_flight_mean']:.2f}" if f["in_flight_mean"] is not None else ""
    cpu = " ".join(f"{k}={v:.2f}" for k, v in f["cpu"].items() if v >= 0.005)
    line += (
        f"\n        cores: {cpu} client={f['client_cpu']:.2f} idle-other-server={f['idle_server_cpu']:.3f}"
    )
    line += f" rest-of-machine={f['others_cpu']:.2f}"
    return line


def cores(f: dict[str, dict[str, Any]]) -> str:
    """CPU actually used by the model loops (busy time is wall time, and counts a preempted forward)."""
    lw, pp = f["lightweight"]["cpu"], f["pp"]["cpu"]
    return f"{lw.get('model process', 0):.2f} / {pp.get('rank0 model', 0):.2f}, {pp.get('rank1', 0):.2f}"


def main() -> int:
    # SIGTERM (timeout, kill) as an exit, so that the finally: blocks stop the servers this started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32, help="per measured window (2 waves at c16)")
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--prefill-chunk", type=int, default=0, help="PP's prompt tokens per step (0: whole)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle CPU check of each server")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    t_start = time.monotonic()
    model_dir = ensure_tiny_model(shape=SHAPE)
    requests = payloads(model_dir, args.requests, args.input_len, args.output_len, seed=0)
    warmup = payloads(model_dir, args.warmup, args.input_len, args.output_len, seed=1)
    log_dir = Path("/tmp/llmstack-pp-bench")
    log_dir.mkdir(exist_ok=True)
    servers: dict[str, Server] = {}
    try:
        # One at a time: loading both at once would only slow both starts.
        for kind in ("lightweight", "pp"):
            port = free_port()
            servers[kind] = Server(kind, server_argv(kind, model_dir, port, args), port,
                                   log_dir / f"{kind}-{port}.log")  # fmt: skip
            ready = servers[kind].wait_ready()
            print(
                f"{kind} ready in {ready:.1f} s at {servers[kind].url}; log {servers[kind].log}", flush=True
            )
        idle: dict[str, dict[str, float]] = {}
        for kind, server in servers.items():
            idle[kind] = idle_cpu(server, args.idle_s)
            shown = " ".join(f"{k}={v:.3f}" for k, v in idle[kind].items())
            print(f"{kind} idle, cores used over {args.idle_s:g} s: {shown}", flush=True)
        for kind, server in servers.items():
            measure(server, None, warmup, args.concurrency)  # warm-up, not recorded
            print(f"{kind} warmed up", flush=True)

        rounds: list[dict[str, dict[str, Any]]] = []
        for r in range(args.rounds):
            order = ("lightweight", "pp") if r % 2 == 0 else ("pp", "lightweight")
            figures: dict[str, dict[str, Any]] = {}
            for kind in order:
                other = servers["pp" if kind == "lightweight" else "lightweight"]
                figures[kind] = measure(servers[kind], other, requests, args.concurrency)
                print(f"round {r + 1} {kind:<11} {describe(figures[kind])}", flush=True)
            rounds.append(figures)
        for kind, server in servers.items():
            idle[f"{kind} after"] = idle_cpu(server, args.idle_s)
    finally:
        for server in servers.values():
            server.stop()

    ratios = [f["pp"]["output_tok_s"] / f["lightweight"]["output_tok_s"] for f in rounds]
    print(f"\nresults: c{args.concurrency}, {args.input_len} in / {args.output_len} out, {args.requests} "
          f"requests per window, model {SHAPE.name}; total {time.monotonic() - t_start:.0f} s")  # fmt: skip
    print(
        "| round | lightweight tok/s | pp tok/s | pp / lightweight | stage 0 busy | stage 1 busy "
        "| cores: lw model / pp rank0 model, rank1 | rest of machine (cores) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r, (f, ratio) in enumerate(zip(rounds, ratios, strict=True)):
        busy = f["pp"]["busy"]
        noise = (f["lightweight"]["others_cpu"] + f["pp"]["others_cpu"]) / 2
        print(f"| {r + 1} | {f['lightweight']['output_tok_s']:.1f} | {f['pp']['output_tok_s']:.1f} "
              f"| {ratio:.2f} | {busy[0]:.0%} | {busy[1]:.0%} | {cores(f)} | {noise:.2f} |")  # fmt: skip
    med = {k: statistics.median(f[k]["output_tok_s"] for f in rounds) for k in ("lightweight", "pp")}
    busy_med = [statistics.median(f["pp"]["busy"][s] for f in rounds) for s in range(2)]
    print(f"| **median** | {med['lightweight']:.1f} | {med['pp']:.1f} | {statistics.median(ratios):.2f} "
          f"(target >= 1.3) | {busy_med[0]:.0%} | {busy_med[1]:.0%} (target >= 80 %) | | |")  # fmt: skip
    for kind, shown in idle.items():
        print(f"idle {kind}: " + " ".join(f"{k}={v:.3f}" for k, v in shown.items()) + " cores")
    if args.out:
        args.out.write_text(json.dumps({"rounds": rounds, "ratios": ratios, "idle": idle, "args": vars(args)},
                                       default=str, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
