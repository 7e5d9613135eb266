"""Timing accuracy: TTFT and ITL as clients measure them vs the server's truth, ours vs `vllm bench serve`.

The stub (`sse_stub.py --mode timed`) sends the first token 50 ms after a request arrived and then one token
every 10 ms, on absolute deadlines, and writes into every token's text the request's kernel arrival time and
the token's send time (CLOCK_MONOTONIC ns). Both clients stamp with `time.perf_counter()`, which on Linux is
the same clock, so per request:

    true TTFT  = first token sent - request arrived            (the stub's view)
    TTFT error = client TTFT - true TTFT
               = (request arrived - client stamped its send)   "send side"
               + (client stamped the first token - token sent) "receive side"
    ITL error  = client gap between tokens k-1 and k - (send time of k - send time of k-1)

The stub's lateness (send time - deadline, its read delay included) is printed too: it does not enter the
errors above, which use the actual send times, but it shows whether the stub kept the asked schedule.
Stub and clients are pinned to different CPUs; runs alternate between the clients.

    flock /tmp/llmstack-heavy.lock .venv/bin/python benchmarks/timing_accuracy.py --reps 2
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clients import Worker, check_shared_clock, pin, start_stub


@dataclass
class Errors:
    """Per-run samples, in milliseconds."""

    true_ttft: list[float] = field(default_factory=list)
    client_ttft: list[float] = field(default_factory=list)
    ttft_error: list[float] = field(default_factory=list)
    send_side: list[float] = field(default_factory=list)
    receive_side: list[float] = field(default_factory=list)  # every token, not only the first
    itl_error: list[float] = field(default_factory=list)
    stub_lateness: list[float] = field(default_factory=list)
    failed: int = 0
    unparsed: int = 0

    def extend(self, other: Errors) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(other, name)
            if isinstance(value, list):
                getattr(self, name).extend(value)
            else:
                setattr(self, name, getattr(self, name) + value)


def stub_tokens(text: str) -> list[tuple[int, int, int]]:
    """(k, arrival_ns, send_ns) of every token, from the text the stub wrote."""
    out = []
    for part in text.split(";"):
        if part:
            k, arrival, sent = part.split(",")
            out.append((int(k), int(arrival), int(sent)))
    return out


def collect(kind: str, reply: dict[str, Any], first_ns: int, itl_ns: int) -> Errors:
    errors = Errors()
    for request in reply["requests"]:
        if not request["ok"]:
            errors.failed += 1
            continue
        try:
            tokens = stub_tokens(request["text"])
        except ValueError:
            errors.unparsed += 1
            continue
        if kind == "ours":
            sent_at = request["sent_at"]
            stamps = request["chunk_times"]
        else:  # vLLM: start time, TTFT and the gaps after it
            sent_at = request["start"]
            stamps = list(itertools.accumulate([request["start"] + request["ttft"], *request["itl"]]))
        if len(stamps) != len(tokens) or [k for k, _, _ in tokens] != list(range(len(tokens))):
            errors.unparsed += 1
            continue
        arrival = tokens[0][1] / 1e9
        sends = [sent / 1e9 for _, _, sent in tokens]
        true_ttft = sends[0] - arrival
        client_ttft = stamps[0] - sent_at
        errors.true_ttft.append(true_ttft * 1e3)
        errors.client_ttft.append(client_ttft * 1e3)
        errors.ttft_error.append((client_ttft - true_ttft) * 1e3)
        errors.send_side.append((arrival - sent_at) * 1e3)
        errors.receive_side.extend((stamp - sent) * 1e3 for stamp, sent in zip(stamps, sends, strict=True))
        errors.itl_error.extend(
            ((stamps[k] - stamps[k - 1]) - (sends[k] - sends[k - 1])) * 1e3 for k in range(1, len(stamps))
        )
        errors.stub_lateness.extend(
            (sent - (tokens[0][1] + first_ns + k * itl_ns)) / 1e6 for k, _, sent in tokens
        )
    return errors


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def late_share(errors: Errors, itl_ms: float) -> float:
    """Share of tokens stamped half a token interval or more after they were sent.

    With kernel receive stamps this happens only when the client read a socket so late that a later token
    had arrived too: the kernel keeps one time per read, that of the newest data.
    """
    late = sum(1 for e in errors.receive_side if e >= itl_ms / 2)
    return late / len(errors.receive_side) if errors.receive_side else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2, help="runs of each client, alternated")
    parser.add_argument("--num-prompts", type=int, default=2560)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--first-token-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--warmup", type=int, default=256)
    parser.add_argument("--stub-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--clients", default="ours,vllm", help="comma-separated: ours, vllm")
    args = parser.parse_args()
    check_shared_clock()

    from llmstack.models.tiny import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    pin(0, args.stub_cpu)  # the driver only waits
    log = Path(tempfile.mkdtemp(prefix="timing-accuracy-")) / "clients.log"
    kinds = args.clients.split(",")
    stub = start_stub(
        "--mode", "timed", "--tokens", str(args.tokens),
        "--first-token-ms", str(args.first_token_ms), "--itl-ms", str(args.itl_ms),
        cpu=args.stub_cpu,
    )  # fmt: skip
    workers = {kind: Worker(kind, args.client_cpu, log) for kind in kinds}
    first_ns, itl_ns = int(args.first_token_ms * 1e6), int(args.itl_ms * 1e6)
    totals = {kind: Errors() for kind in kinds}
    try:
        command = {
            "url": stub.url,
            "model_dir": model_dir,
            "num_prompts": args.num_prompts,
            "concurrency": args.concurrency,
            "input_len": args.input_len,
            "output_len": args.tokens,
            "warmup": args.warmup,
            "detail": True,
            "extra_args": ["--disable-tqdm"],
        }
        for rep in range(args.reps):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                reply = workers[kind].run(**command)
                errors = collect(kind, reply, first_ns, itl_ns)
                totals[kind].extend(errors)
                rate = reply["completed"] / reply["duration"]
                print(
                    f"rep {rep} {kind:5s} {len(errors.ttft_error)} requests ({errors.failed} failed, "
                    f"{errors.unparsed} unparsed), {rate:.0f} req/s: TTFT error "
                    f"p50 {pct(errors.ttft_error, 50):.3f} ms, p99 {pct(errors.ttft_error, 99):.3f} ms;"
                    f" client TTFT p50 {pct(errors.client_ttft, 50):.1f} ms,"
                    f" p99 {pct(errors.client_ttft, 99):.1f} ms;"
                    f" tokens stamped >= half an interval late {late_share(errors, args.itl_ms):.2%};"
                    f" stub lateness p99 {pct(errors.stub_lateness, 99):.3f} ms",
                    flush=True,
                )
    finally:
        for worker in workers.values():
            worker.close()
        stub_stats = stub.stop()

    print()
    print(f"stub: {stub_stats}; client log: {log}")
    print()
    names = {"ours": "llmstack", "vllm": "`vllm bench serve`"}
    print(
        f"Concurrency {args.concurrency}, {args.tokens} tokens per request, truth: first token "
        f"{args.first_token_ms:g} ms after arrival, then every {args.itl_ms:g} ms. All figures in ms."
    )
    print()
    print("| measure | " + " | ".join(names[k] for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    rows = [
        ("requests measured (failed)", lambda e: f"{len(e.ttft_error)} ({e.failed})"),
        ("true TTFT p50 / p99 (stub)", lambda e: f"{pct(e.true_ttft, 50):.3f} / {pct(e.true_ttft, 99):.3f}"),
        ("client TTFT p50 / p99", lambda e: f"{pct(e.client_ttft, 50):.3f} / {pct(e.client_ttft, 99):.3f}"),
        ("**TTFT error p50 / p99 / max**", lambda e: (
            f"**{pct(e.ttft_error, 50):.3f} / {pct(e.ttft_error, 99):.3f}** / {max(e.ttft_error):.3f}")),
        ("— send side p50 / p99", lambda e: f"{pct(e.send_side, 50):.3f} / {pct(e.send_side, 99):.3f}"),
        ("— receive side, all tokens, p50 / p99", lambda e: (
            f"{pct(e.receive_side, 50):.3f} / {pct(e.receive_side, 99):.3f}")),
        ("ITL error p50 / p99 / max |·|", lambda e: (
            f"{pct(e.itl_error, 50):.3f} / {pct(e.itl_error, 99):.3f} / {max(map(abs, e.itl_error)):.3f}")),
        (f"tokens stamped >= {args.itl_ms / 2:g} ms late", lambda e: f"{late_share(e, args.itl_ms):.2%}"),
        ("stub lateness p50 / p99 / max", lambda e: (
            f"{pct(e.stub_lateness, 50):.3f} / {pct(e.stub_lateness, 99):.3f} / {max(e.stub_lateness):.3f}")),
    ]  # fmt: skip
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(totals[k]) for k in kinds) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
