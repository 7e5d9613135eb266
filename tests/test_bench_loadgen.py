"""Load generation against a small OpenAI-style streaming server on loopback (run in its own thread)."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise

import pytest

from llmstack.bench.loadgen import LoadResult, arrival_offsets, run_load, run_load_sync
from llmstack.bench.metrics import summarize_load

pytestmark = pytest.mark.timeout(60)


@dataclass
class FakeServer:
    """Streams `max_tokens` one-token chunks after `delay_s`; counts connections and requests in flight."""

    delay_s: float = 0.0
    fail_every: int = 0  # answer every n-th request with HTTP 500
    url: str = ""
    connections: int = 0
    requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                payload = json.loads(await reader.readexactly(length))
                self.requests += 1
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    writer.write(self.response(payload))
                    await writer.drain()
                finally:
                    self.in_flight -= 1
        finally:
            writer.close()

    def response(self, payload: dict) -> bytes:
        if self.fail_every and self.requests % self.fail_every == 0:
            body = b'{"error": {"message": "synthetic failure"}}'
            return b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        tokens = payload["max_tokens"]
        events = [
            b'data: {"choices":[{"index":0,"text":"t%d ","finish_reason":null}]}\n\n' % i
            for i in range(tokens)
        ]
        usage = {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": 4 + tokens}
        events.append(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + body
        )


@contextmanager
def serving(server: FakeServer) -> Iterator[FakeServer]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        ready.set()
        await stop.wait()
        listener.close()
        for task in list(server.handlers):
            task.cancel()
        await asyncio.gather(*server.handlers, return_exceptions=True)
        await listener.wait_closed()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield server
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
        assert not thread.is_alive()


def payloads(count: int, max_tokens: int = 4) -> list[dict]:
    return [{"model": "m", "prompt": f"p{i}", "max_tokens": max_tokens, "stream": True} for i in range(count)]


def test_arrival_offsets() -> None:
    offsets = arrival_offsets(200, 100.0, burstiness=1.0, seed=7)
    assert offsets == arrival_offsets(200, 100.0, burstiness=1.0, seed=7)
    assert offsets != arrival_offsets(200, 100.0, burstiness=1.0, seed=8)
    assert all(b > a for a, b in pairwise(offsets))
    assert offsets[-1] == pytest.approx(2.0, rel=1e-12)
    assert arrival_offsets(4, 2.0, burstiness=math.inf) == [0.5, 1.0, 1.5, 2.0]

    # Burstier traffic (shape < 1) has more variable gaps than Poisson.
    def cv(xs: list[float]) -> float:
        gaps = [b - a for a, b in pairwise([0.0, *xs])]
        mean = sum(gaps) / len(gaps)
        return (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean

    assert (
        cv(arrival_offsets(2000, 10.0, 0.25, seed=1))
        > 1.5
        > cv(arrival_offsets(2000, 10.0, 1.0, seed=1))
        > 0.8
    )
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)


def test_open_loop_rate_is_met_without_drift() -> None:
    count, rate = 200, 100.0
    with serving(FakeServer()) as server:
        result = asyncio.run(
            run_load(
                server.url,
                payloads(count),
                endpoint="/v1/completions",
                concurrency=None,
                request_rate=rate,
                seed=3,
                timeout_s=10,
            )
        )
    records = result.records
    assert all(r.success for r in records), {r.error for r in records}
    sent = [r.sent_at - result.start for r in records]
    assert sent == sorted(sent)
    achieved = count / sent[-1]
    assert abs(achieved - rate) / rate < 0.02
    offsets = arrival_offsets(count, rate, seed=3)
    lateness = [r.sent_at - r.scheduled_at for r in records]
    assert [r.scheduled_at - result.start for r in records] == pytest.approx(offsets, abs=1e-9)
    # Absolute schedule: sends are never early, and a late one (a stall of a loaded machine) does not delay
    # the ones after it: the last send is still on time.
    assert min(lateness) >= 0
    assert max(lateness) < 0.1
    assert sent[-1] == pytest.approx(count / rate, abs=0.02)
    summary = summarize_load(result)
    assert summary["request_rate"] == rate and summary["completed"] == count
    assert summary["total_output_tokens"] == 4 * count
    assert summary["p99_client_queue_time_ms"] < 20


def test_closed_loop_keeps_one_connection_per_worker() -> None:
    progress: list[tuple[int, int]] = []
    with serving(FakeServer(delay_s=0.01)) as server:
        result = run_load_sync(
            server.url,
            payloads(40, max_tokens=3),
            endpoint="/v1/completions",
            concurrency=4,
            timeout_s=10,
            progress=lambda done, total, _ttft: progress.append((done, total)),
        )
        connections, peak = server.connections, server.peak_in_flight
    assert isinstance(result, LoadResult)
    assert [r.index for r in result.records] == list(range(40))
    assert all(r.success for r in result.records)
    assert all(r.output_text == "t0 t1 t2 " and r.completion_tokens == 3 for r in result.records)
    assert all(r.expected_output_tokens == 3 and r.scheduled_at is None for r in result.records)
    assert (connections, peak) == (4, 4)
    # Throttled to one call per 0.1 s: the first request, maybe a few more, and always the last.
    assert progress[0] == (1, 40) and progress[-1] == (40, 40)
    assert [done for done, _ in progress] == sorted({done for done, _ in progress})
    assert all(result.start <= r.sent_at <= result.end for r in result.records)
    summary = summarize_load(result)
    assert summary["max_concurrency"] == 4 and summary["request_rate"] == "inf"
    assert summary["max_concurrent_requests"] == 4


def test_open_loop_with_concurrency_cap_records_client_queue_time() -> None:
    with serving(FakeServer(delay_s=0.05)) as server:
        result = run_load_sync(
            server.url,
            payloads(12),
            endpoint="/v1/completions",
            concurrency=2,
            request_rate=1000.0,
            timeout_s=10,
        )
        connections, peak = server.connections, server.peak_in_flight
    assert all(r.success for r in result.records)
    assert (connections, peak) == (2, 2)
    queue = [r.client_queue_time for r in result.records]
    assert all(q is not None and q >= 0 for q in queue)
    # Twelve requests arrive within 12 ms but only two run at a time, 50 ms each: the last waits ~250 ms.
    assert max(queue) > 0.2
    summary = summarize_load(result)
    assert summary["mean_client_queue_time_ms"] > 100


def test_failures_are_recorded_and_do_not_stop_the_run() -> None:
    with serving(FakeServer(fail_every=3)) as server:
        result = run_load_sync(
            server.url, payloads(9), endpoint="/v1/completions", concurrency=1, timeout_s=10, api_key="k"
        )
    outcomes = [r.success for r in result.records]
    assert outcomes == [True, True, False] * 3
    failed = [r for r in result.records if not r.success]
    assert {r.error for r in failed} == {"HTTP 500 Internal Server Error: synthetic failure"}
    summary = summarize_load(result)
    assert (summary["completed"], summary["failed"]) == (6, 3)


def test_unreachable_server_fails_every_request() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_load_sync(
        f"http://127.0.0.1:{port}", payloads(3), endpoint="/v1/completions", concurrency=2, timeout_s=2
    )
    assert [r.success for r in result.records] == [False] * 3
    assert all(r.error and "failed" in r.error for r in result.records)


@pytest.mark.parametrize("defer_parse_bytes", [0, 1000])
def test_parsing_during_the_run_gives_the_same_records(defer_parse_bytes: int) -> None:
    """A parse budget of 0 parses each response as it ends; a small one parses in batches during the run."""
    with serving(FakeServer()) as server:
        deferred = run_load_sync(
            server.url, payloads(30, max_tokens=5), endpoint="/v1/completions", concurrency=3, timeout_s=10
        )
        bounded = run_load_sync(
            server.url,
            payloads(30, max_tokens=5),
            endpoint="/v1/completions",
            concurrency=3,
            timeout_s=10,
            defer_parse_bytes=defer_parse_bytes,
        )
    for a, b in zip(deferred.records, bounded.records, strict=True):
        assert a.success and b.success, (a.error, b.error)
        assert (a.output_text, a.completion_tokens, len(a.chunk_times)) == ("t0 t1 t2 t3 t4 ", 5, 5)
        assert (b.output_text, b.completion_tokens, len(b.chunk_times)) == ("t0 t1 t2 t3 t4 ", 5, 5)
        assert b.sent_at is not None and b.done_at is not None and b.sent_at < b.chunk_times[0] <= b.done_at


def test_collector_is_off_inside_the_window_and_restored_after() -> None:
    import gc

    seen: list[bool] = []
    with serving(FakeServer()) as server:
        run_load_sync(
            server.url,
            payloads(5),
            endpoint="/v1/completions",
            concurrency=1,
            timeout_s=10,
            progress=lambda done, total, _ttft: seen.append(gc.isenabled()),
        )
    assert seen and not any(seen)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_the_package_docstring_example_runs_against_any_server(capsys: pytest.CaptureFixture[str]) -> None:
    """The example in `llmstack.bench`'s docstring, as written (only the server's address is ours): the
    client needs nothing of the launcher."""
    import textwrap

    import llmstack.bench

    doc = llmstack.bench.__doc__ or ""
    example = textwrap.dedent(doc.split("without the launcher:\n", 1)[1])
    with serving(FakeServer()) as server:
        exec(example.replace("http://localhost:8000", server.url), {})
    throughput, ttft = capsys.readouterr().out.split()
    assert float(throughput) > 0 and float(ttft) >= 0


def test_the_client_imports_nothing_of_the_launcher() -> None:
    code = (
        "import sys, llmstack.bench.loadgen, llmstack.bench.metrics, llmstack.bench.datasets, "
        "llmstack.bench.images, llmstack.bench.prompts, llmstack.bench.wrk;"
        "outside = sorted(m for m in sys.modules if m.startswith('llmstack.') and m != 'llmstack.bench' "
        "and not m.startswith('llmstack.bench.'));"
        "sys.exit(str(outside) if outside else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("request_rate", [math.inf, 400.0])
def test_progress_reports_the_latest_requests_ttft(request_rate: float) -> None:
    # The live status line shows TTFT: the progress call parses the latest response alone (the records
    # themselves are parsed after the window), and says exactly what its record will say.
    calls: list[tuple[int, int, float | None]] = []
    with serving(FakeServer(delay_s=0.01)) as server:
        result = run_load_sync(
            server.url,
            payloads(12, max_tokens=3),
            endpoint="/v1/completions",
            concurrency=3,
            request_rate=request_rate,
            timeout_s=10,
            progress=lambda done, total, ttft: calls.append((done, total, ttft)),
        )
    ttfts = {r.first_content_at - r.sent_at for r in result.records}
    assert calls[-1][:2] == (12, 12)
    assert all(ttft is not None and ttft in ttfts for _, _, ttft in calls)
