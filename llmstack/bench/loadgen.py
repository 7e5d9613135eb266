"""Load generation against an OpenAI-compatible server: closed loop (fixed concurrency) or open loop (rate).

Closed loop (`request_rate=inf`): `concurrency` workers, each with its own keep-alive connection, pull the
next payload as soon as their previous request ends. `concurrency=None` sends every request at once.

Open loop (finite `request_rate`): arrivals follow gamma-distributed gaps (shape `burstiness`, mean `1/rate`;
burstiness 1 is a Poisson process), laid out on an absolute timeline `t0 + offset_i` so that late wake-ups
never accumulate into drift. `concurrency` then caps the requests in flight; a request that has to wait for
a free connection keeps its `scheduled_at`, so the wait shows up as client queue time instead of being hidden.

Connections are opened before the measured window starts. Payloads are complete JSON bodies built by the
caller; this module only serialises them (also before the window) and sends them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from llmstack.bench.http import HttpConnection, PreparedRequest, Target, parse_url, prepare_request
from llmstack.bench.records import RequestRecord

__all__ = ["LoadResult", "arrival_offsets", "run_load", "run_load_sync"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

# Without a concurrency cap the number of connections an open loop needs is unknown; opening about one
# second's worth of arrivals up front keeps connection setup out of the first requests' latency.
_MAX_PREOPENED_UNCAPPED = 256


@dataclass(slots=True, repr=False)
class LoadResult:
    """Records in payload order, and the measured window in `perf_counter` seconds.

    The window starts just before the first request is sent (connections already open) and ends when the last
    response has finished; throughputs are computed over it.
    """

    records: list[RequestRecord]
    start: float
    end: float
    concurrency: int | None
    request_rate: float
    burstiness: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    def __repr__(self) -> str:
        # Short on purpose: asyncio formats the main task's result into exception messages on Python 3.11,
        # and the full repr of 100k records takes seconds.
        ok = sum(r.success for r in self.records)
        return (
            f"LoadResult({ok}/{len(self.records)} ok, {self.duration:.3f} s, concurrency={self.concurrency}, "
            f"request_rate={self.request_rate}, burstiness={self.burstiness})"
        )


def arrival_offsets(count: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds after t0) for an open loop of `count` requests.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate; `burstiness=inf` gives constant
    gaps. As in vLLM, the cumulative offsets are then rescaled so that the last arrival lands exactly at
    `count / rate`: the realised rate of a finite sample is the asked rate, not a random variable around it.
    """
    if count <= 0:
        return []
    if not request_rate > 0 or math.isinf(request_rate):
        raise ValueError(f"request_rate must be a finite positive number, got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    mean_gap = 1.0 / request_rate
    if math.isinf(burstiness):
        return [mean_gap * (i + 1) for i in range(count)]
    rng = random.Random(seed)
    scale = mean_gap / burstiness
    offsets: list[float] = []
    elapsed = 0.0
    for _ in range(count):
        elapsed += rng.gammavariate(burstiness, scale)
        offsets.append(elapsed)
    target_end = count * mean_gap
    factor = target_end / elapsed if elapsed > 0 else 1.0
    return [offset * factor for offset in offsets]


async def run_load(
    base_url: str,
    payloads: Sequence[dict[str, Any]],
    *,
    endpoint: str,
    concurrency: int | None,
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    seed: int = 0,
    api_key: str | None = None,
    timeout_s: float,
    progress: ProgressCallback | None = None,
    input_lens: Sequence[int | None] | None = None,
) -> LoadResult:
    """Send every payload to `base_url + endpoint` and return one record per payload (same order).

    `input_lens` optionally gives each prompt's expected token count (used when the server reports no usage).
    """
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1 or None, got {concurrency}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be positive, got {request_rate}")
    if input_lens is not None and len(input_lens) != len(payloads):
        raise ValueError("input_lens must have one entry per payload")
    target = parse_url(base_url.rstrip("/") + endpoint)
    prepared = [prepare_request(target, payload, api_key=api_key) for payload in payloads]
    records = [
        RequestRecord(
            index=i,
            expected_input_tokens=input_lens[i] if input_lens is not None else None,
            expected_output_tokens=_requested_output_tokens(payload),
            stream=bool(payload.get("stream")),
        )
        for i, payload in enumerate(payloads)
    ]
    counter = _Progress(len(records), progress)
    # Like vLLM: a frozen heap makes the collector's pauses short and rare during the run.
    gc.collect()
    gc.freeze()
    try:
        if math.isinf(request_rate):
            workers = len(records) if concurrency is None else min(concurrency, len(records))
            start, end = await _closed_loop(target, prepared, records, workers, timeout_s, counter)
        else:
            offsets = arrival_offsets(len(records), request_rate, burstiness, seed)
            start, end = await _open_loop(target, prepared, records, offsets, concurrency, timeout_s, counter)
    finally:
        gc.unfreeze()
    failed = sum(not r.success for r in records)
    if failed:
        logger.info("%d of %d requests failed", failed, len(records))
    return LoadResult(records, start, end, concurrency, request_rate, burstiness)


def run_load_sync(*args: Any, **kwargs: Any) -> LoadResult:
    """`run_load` in a fresh event loop (uvloop when installed)."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_load(*args, **kwargs))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _requested_output_tokens(payload: dict[str, Any]) -> int | None:
    for key in ("max_tokens", "max_completion_tokens"):
        value = payload.get(key)
        if isinstance(value, int):
            return value
    return None


class _Progress:
    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback

    def step(self) -> None:
        self.done += 1
        if self.callback is not None:
            try:
                self.callback(self.done, self.total)
            except Exception:
                # A broken progress bar must not abort a benchmark.
                logger.exception("progress callback failed")
                self.callback = None


async def _open_connections(target: Target, count: int, timeout_s: float) -> list[HttpConnection]:
    connections = [HttpConnection(target, connect_timeout_s=timeout_s) for _ in range(count)]
    results = await asyncio.gather(*(c.connect() for c in connections), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        # Not fatal here: each request retries the connect and records the failure itself.
        logger.warning("%d of %d connections failed to open: %s", len(errors), count, errors[0])
    return connections


async def _closed_loop(
    target: Target,
    prepared: list[PreparedRequest],
    records: list[RequestRecord],
    workers: int,
    timeout_s: float,
    counter: _Progress,
) -> tuple[float, float]:
    connections = await _open_connections(target, workers, timeout_s)
    # One shared iterator: next() never yields to the loop, so no index is taken twice.
    pending = iter(range(len(records)))

    async def worker(connection: HttpConnection) -> None:
        for i in pending:
            await connection.send(prepared[i], records[i], timeout_s=timeout_s)
            counter.step()

    start = perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in connections))
        end = perf_counter()
    finally:
        await _close_all(connections)
    return start, end


class _ConnectionPool:
    """Idle connections (most recently used first) under an optional cap on connections in use."""

    def __init__(self, target: Target, limit: int | None, timeout_s: float) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.idle: list[HttpConnection] = []
        self.all: list[HttpConnection] = []
        # asyncio.Semaphore wakes waiters in FIFO order, so queued requests go out in schedule order.
        self._slots = asyncio.Semaphore(limit) if limit is not None else None

    async def acquire(self) -> HttpConnection:
        if self._slots is not None:
            await self._slots.acquire()
        if self.idle:
            return self.idle.pop()
        connection = HttpConnection(self.target, connect_timeout_s=self.timeout_s)
        self.all.append(connection)
        return connection

    def release(self, connection: HttpConnection) -> None:
        self.idle.append(connection)
        if self._slots is not None:
            self._slots.release()


async def _open_loop(
    target: Target,
    prepared: list[PreparedRequest],
    records: list[RequestRecord],
    offsets: list[float],
    cap: int | None,
    timeout_s: float,
    counter: _Progress,
) -> tuple[float, float]:
    pool = _ConnectionPool(target, cap, timeout_s)
    count = len(records)
    if cap is not None:
        preopen = min(cap, count)
    else:
        arrivals_per_s = count / offsets[-1] if offsets and offsets[-1] > 0 else count
        preopen = min(count, _MAX_PREOPENED_UNCAPPED, max(1, math.ceil(arrivals_per_s)))
    opened = await _open_connections(target, preopen, timeout_s)
    pool.idle.extend(opened)
    pool.all.extend(opened)

    async def send(i: int) -> None:
        connection = await pool.acquire()
        try:
            await connection.send(prepared[i], records[i], timeout_s=timeout_s)
        finally:
            pool.release(connection)
        counter.step()

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    start = perf_counter()
    try:
        i = 0
        while i < count:
            now = perf_counter()
            # Everything already due goes out now; a late wake-up never shifts later arrivals.
            while i < count and start + offsets[i] <= now:
                records[i].scheduled_at = start + offsets[i]
                tasks.append(loop.create_task(send(i)))
                i += 1
            if i < count:
                await asyncio.sleep(start + offsets[i] - now)
        await asyncio.gather(*tasks)
        end = perf_counter()
    finally:
        for task in tasks:
            task.cancel()
        await _close_all(pool.all)
    return start, end


async def _close_all(connections: list[HttpConnection]) -> None:
    for connection in connections:
        connection.close()
    # Let the transports run connection_lost so no socket outlives the run.
    await asyncio.sleep(0)
