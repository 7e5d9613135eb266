"""The send loops of `llmstack.bench.loadgen`: closed (a fixed number of requests, or a fixed time) and open
(an arrival schedule), with the progress counter, the connection pool and the backlog of responses still to
be parsed. `loadgen` is the interface; this is how a run spends its window.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter

from llmstack.bench.http import HttpConnection, PreparedRequest, RawResponse, Target
from llmstack.bench.records import RequestRecord

logger = logging.getLogger(__name__)

# Called with (requests finished, requests in all, the time to first content in seconds of the latest request
# to finish, None when it has none: not streamed, failed); a run of fixed duration does not know the total: 0.
ProgressCallback = Callable[[int, int, "float | None"], None]
# True when the run must end now (a stop signal, a dead engine).
StopCheck = Callable[[], bool]

# Without a concurrency cap the number of connections an open loop needs is unknown; opening about one
# second's worth of arrivals up front keeps connection setup out of the first requests' latency.
_MAX_PREOPENED_UNCAPPED = 256
# A progress callback (a terminal bar) runs at most this often, and once more at the end.
_PROGRESS_INTERVAL_S = 0.1
# How often `should_stop` is asked.
_STOP_POLL_S = 0.05


async def run_until_stopped(work: Awaitable[object], should_stop: StopCheck | None) -> bool:
    """Await `work`; if `should_stop()` turns true first, cancel it (and the requests in flight with it).
    True if it was stopped."""
    task = asyncio.ensure_future(work)
    if should_stop is None:
        await task
        return False
    while not task.done():
        await asyncio.wait({task}, timeout=_STOP_POLL_S)
        if not task.done() and should_stop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return True
    task.result()  # its exception, if it failed
    return False


class Progress:
    """Counts finished requests; calls the callback at most every `_PROGRESS_INTERVAL_S` and at the end.

    Unthrottled, a terminal progress bar would cost one write per request: at thousands of requests per
    second, a real share of the client's CPU. `total` None: a run of fixed duration (reported as 0).
    """

    def __init__(self, total: int | None, callback: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback
        self._next_call = 0.0

    def step(self, record: RequestRecord, response: RawResponse | None) -> None:
        self.done += 1
        if self.callback is None:
            return
        now = perf_counter()
        if now < self._next_call and (self.total is None or self.done < self.total):
            return
        self._next_call = now + _PROGRESS_INTERVAL_S
        try:
            self.callback(self.done, self.total or 0, _time_to_first_content(record, response))
        except Exception:
            # A broken progress bar must not abort a benchmark.
            logger.exception("progress callback failed")
            self.callback = None


def _time_to_first_content(record: RequestRecord, response: RawResponse | None) -> float | None:
    """TTFT of one finished request, parsed from a copy of its record (the record itself is parsed after
    the window): one response per progress call, at most ten a second."""
    if response is None or not response.stream or record.sent_at is None:
        return None
    scratch = dataclasses.replace(record)
    # A copy of the response too: apply() drops the bytes it parsed, and the window's end parses them again.
    dataclasses.replace(response, read_data=list(response.read_data)).apply(scratch)
    if scratch.first_content_at is None:
        return None
    return scratch.first_content_at - record.sent_at


class Backlog:
    """Raw responses waiting to be parsed into their records, oldest first, within a byte budget."""

    def __init__(self, records: list[RequestRecord], budget_bytes: int) -> None:
        self.records = records
        self.budget = budget_bytes
        self.pending: deque[tuple[int, RawResponse]] = deque()
        self.bytes = 0

    def add(self, index: int, response: RawResponse | None) -> None:
        if response is None:
            return  # nothing to parse: the record is complete (connect failure)
        self.pending.append((index, response))
        self.bytes += response.size
        if self.bytes > self.budget:
            # Over budget: parse down to half of it, so this happens in a few batches, not per request.
            while self.pending and self.bytes > self.budget // 2:
                self._apply_oldest()

    def _apply_oldest(self) -> None:
        index, response = self.pending.popleft()
        self.bytes -= response.size
        response.apply(self.records[index])

    def apply_all(self) -> None:
        while self.pending:
            self._apply_oldest()


async def _open_connections(target: Target, count: int, timeout_s: float) -> list[HttpConnection]:
    connections = [HttpConnection(target, connect_timeout_s=timeout_s) for _ in range(count)]
    results = await asyncio.gather(*(c.connect() for c in connections), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        # Not fatal here: each request retries the connect and records the failure itself.
        logger.warning("%d of %d connections failed to open: %s", len(errors), count, errors[0])
    return connections


@dataclass(slots=True)
class Run:
    target: Target
    prepared: list[PreparedRequest]
    records: list[RequestRecord]
    timeout_s: float
    counter: Progress
    backlog: Backlog
    should_stop: StopCheck | None = None
    stopped: bool = False


async def closed_loop(run: Run, workers: int) -> tuple[float, float]:
    connections = await _open_connections(run.target, workers, run.timeout_s)
    prepared, records, timeout_s, backlog, counter = (
        run.prepared, run.records, run.timeout_s, run.backlog, run.counter
    )  # fmt: skip
    # One shared iterator: next() never yields to the loop, so no index is taken twice.
    pending = iter(range(len(records)))

    should_stop = run.should_stop

    async def worker(connection: HttpConnection) -> None:
        for i in pending:
            response = await connection.send_deferred(prepared[i], records[i], timeout_s=timeout_s)
            backlog.add(i, response)
            counter.step(records[i], response)
            # A failure may mean a dead server, where the rest would fail at once: ask now, not in 50 ms.
            if should_stop is not None and records[i].error is not None and should_stop():
                return

    try:
        start = perf_counter()
        work = asyncio.gather(*(worker(c) for c in connections))
        # Workers that saw the stop themselves return early, before the watcher may have.
        run.stopped = await run_until_stopped(work, run.should_stop) or any(
            r.sent_at is None for r in records
        )
        end = perf_counter()
    finally:
        await _close_all(connections)
    return start, end


async def timed_loop(
    run: Run, templates: list[RequestRecord], workers: int, duration_s: float
) -> tuple[float, float]:
    """The closed loop of a run of fixed duration: each request's record is made as it is sent."""
    connections = await _open_connections(run.target, workers, run.timeout_s)
    prepared, records, timeout_s, backlog, counter = (
        run.prepared, run.records, run.timeout_s, run.backlog, run.counter
    )  # fmt: skip
    should_stop = run.should_stop
    told_to_stop = False

    async def worker(connection: HttpConnection) -> None:
        nonlocal told_to_stop
        while perf_counter() < deadline:
            # Asked before every send (not only every 50 ms): against a dead server they fail at once.
            if should_stop is not None and should_stop():
                told_to_stop = True
                return
            i = len(records)
            j = i % len(prepared)
            template = templates[j]
            record = RequestRecord(
                index=i,
                expected_input_tokens=template.expected_input_tokens,
                expected_output_tokens=template.expected_output_tokens,
                stream=template.stream,
            )
            records.append(record)
            response = await connection.send_deferred(prepared[j], record, timeout_s=timeout_s)
            backlog.add(i, response)
            counter.step(record, response)

    try:
        start = perf_counter()
        deadline = start + duration_s
        work = asyncio.gather(*(worker(c) for c in connections))
        run.stopped = await run_until_stopped(work, should_stop) or told_to_stop
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


async def open_loop(run: Run, offsets: list[float], cap: int | None) -> tuple[float, float]:
    target, prepared, records, timeout_s = run.target, run.prepared, run.records, run.timeout_s
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
            response = await connection.send_deferred(prepared[i], records[i], timeout_s=timeout_s)
        finally:
            pool.release(connection)
        run.backlog.add(i, response)
        run.counter.step(records[i], response)

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    async def schedule(start: float) -> None:
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

    try:
        start = perf_counter()
        run.stopped = await run_until_stopped(schedule(start), run.should_stop)
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
