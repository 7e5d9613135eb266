"""A measuring instrument for the capacity search: an HTTP server on loopback whose latency model is known.

It speaks just enough of the OpenAI API for the online phase's client and engine=external (`GET /v1/models`,
`GET /health`, streamed `POST /v1/completions`), and serves requests in `slots` service slots taken in FIFO
order (asyncio.Semaphore wakes waiters first come, first served). A request that holds a slot from time s
streams its `max_tokens` tokens at s + prefill_s + k * token_s (k = 0 .. n-1), then frees the slot. With
`jitter` > 0 each request's two times are scaled by a factor drawn uniformly in [1 - jitter, 1 + jitter]
(seeded): noisy, but the latency still grows monotonically with load.

`StubModel` computes what the server does for a given load without running it (an event simulation of the
same FIFO slots), so that a test knows where the SLO boundary is, and `benchmarks/capacity_probes.py` can
count probes without waiting for them.

    python -m tests.capacity_stub --port 8123 --slots 4 --prefill-ms 50 --token-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

MODEL_ID = "stub"


@dataclass(frozen=True)
class StubModel:
    slots: int = 4
    prefill_s: float = 0.05
    token_s: float = 0.01
    output_len: int = 8

    @property
    def service_s(self) -> float:
        return self.prefill_s + (self.output_len - 1) * self.token_s

    def open_loop_ttfts(self, rate: float, count: int) -> list[float]:
        """TTFT of each of `count` requests arriving evenly at `rate` requests/s (burstiness inf)."""
        return self._ttfts([(i + 1) / rate for i in range(count)])

    def closed_loop_ttfts(self, concurrency: int, count: int) -> list[float]:
        """TTFT of each of `count` requests sent by `concurrency` closed-loop clients."""
        free = [0.0] * self.slots  # when each slot is free next
        clients = [0.0] * concurrency  # when each client sends next
        heapq.heapify(clients)
        ttfts = []
        for _ in range(count):
            sent = heapq.heappop(clients)
            start = max(sent, heapq.heappop(free))
            heapq.heappush(free, start + self.service_s)
            heapq.heappush(clients, start + self.service_s)
            ttfts.append(start - sent + self.prefill_s)
        return ttfts

    def _ttfts(self, arrivals: list[float]) -> list[float]:
        free = [0.0] * self.slots
        ttfts = []
        for arrival in arrivals:  # FIFO: in arrival order, each takes the slot free first
            start = max(arrival, heapq.heappop(free))
            heapq.heappush(free, start + self.service_s)
            ttfts.append(start - arrival + self.prefill_s)
        return ttfts


def percentile(values: list[float], p: float) -> float:
    """numpy's linear interpolation (what the metrics use), without numpy."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class StubState:
    model: StubModel
    jitter: float = 0.0
    seed: int = 0
    url: str = ""
    served: int = 0
    most_waiting: int = 0
    waiting: int = 0
    rng: random.Random = field(default_factory=random.Random)


async def _serve_connection(state: StubState, slots: asyncio.Semaphore, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:  # fmt: skip
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "GET" and path == "/v1/models":
                card = {"id": MODEL_ID, "object": "model", "max_model_len": 4096}
                _respond(writer, 200, {"object": "list", "data": [card]})
            elif method == "GET" and path == "/health":
                _respond(writer, 200, None)
            elif method == "POST" and path == "/v1/completions":
                await _complete(state, slots, json.loads(body), writer)
            else:
                _respond(writer, 404, {"error": {"message": f"no route {path}"}})
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def _respond(writer: asyncio.StreamWriter, status: int, payload: object | None) -> None:
    data = b"" if payload is None else json.dumps(payload).encode()
    reason = {200: "OK", 404: "Not Found"}[status]
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip


def _chunk(writer: asyncio.StreamWriter, event: str) -> None:
    data = f"data: {event}\n\n".encode()
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


async def _complete(
    state: StubState, slots: asyncio.Semaphore, payload: dict, writer: asyncio.StreamWriter
) -> None:
    n = int(payload.get("max_tokens") or 1)
    scale_p = scale_t = 1.0
    if state.jitter:
        scale_p = state.rng.uniform(1 - state.jitter, 1 + state.jitter)
        scale_t = state.rng.uniform(1 - state.jitter, 1 + state.jitter)
    state.waiting += 1
    state.most_waiting = max(state.most_waiting, state.waiting)
    async with slots:
        state.waiting -= 1
        start = time.perf_counter()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for k in range(n):
            due = start + state.model.prefill_s * scale_p + k * state.model.token_s * scale_t
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            choice = {"index": 0, "text": " x", "finish_reason": "length" if k == n - 1 else None}
            _chunk(writer, json.dumps({"object": "text_completion", "model": MODEL_ID, "choices": [choice]}))
            await writer.drain()
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        _chunk(writer, json.dumps({"object": "text_completion", "choices": [], "usage": usage}))
        _chunk(writer, "[DONE]")
        writer.write(b"0\r\n\r\n")
        state.served += 1


@contextmanager
def stub_server(
    model: StubModel, *, jitter: float = 0.0, seed: int = 0, port: int = 0
) -> Iterator[StubState]:
    """The server on 127.0.0.1 in a thread of its own (its own event loop); stopped and its port freed on
    exit."""
    state = StubState(model, jitter, seed, rng=random.Random(seed))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, asyncio.AbstractServer] = {}

    async def start() -> None:
        slots = asyncio.Semaphore(model.slots)
        server = await asyncio.start_server(
            lambda r, w: _serve_connection(state, slots, r, w), "127.0.0.1", port, backlog=1024
        )
        holder["server"] = server
        state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        ready.set()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()
        server = holder["server"]
        server.close()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=main, name="capacity-stub", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the capacity stub did not start")
    try:
        yield state
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--prefill-ms", type=float, default=50.0)
    parser.add_argument("--token-ms", type=float, default=10.0)
    parser.add_argument("--jitter", type=float, default=0.0)
    args = parser.parse_args()
    model = StubModel(args.slots, args.prefill_ms / 1000, args.token_ms / 1000)
    with stub_server(model, jitter=args.jitter, port=args.port) as state:
        print(f"capacity stub at {state.url}", flush=True)
        with suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
