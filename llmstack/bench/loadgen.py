"""Load generation against an OpenAI-compatible server: closed loop (fixed concurrency) or open loop (rate).

Closed loop (`request_rate=inf`): `concurrency` workers, each with its own keep-alive connection, pull the
next payload as soon as their previous request ends. `concurrency=None` sends every request at once.

Open loop (finite `request_rate`): arrivals follow gamma-distributed gaps (shape `burstiness`, mean `1/rate`;
burstiness 1 is a Poisson process), laid out on an absolute timeline `t0 + offset_i` so that late wake-ups
never accumulate into drift. `concurrency` then caps the requests in flight; a request that has to wait for
a free connection keeps its `scheduled_at`, so the wait shows up as client queue time instead of being hidden.

Connections are opened before the measured window starts. Payloads are complete JSON bodies built by the
caller; this module only serialises them (also before the window) and sends them. Responses are parsed
after the window has ended (`RawResponse`): during the run the client only stamps reads and follows the
HTTP framing, so its capacity goes to sending and receiving. Should the raw bytes waiting to be parsed
exceed `defer_parse_bytes` (long runs), the oldest are parsed during the run to bound memory.

`should_stop` (polled every 50 ms) ends a run early: a stop signal, or an engine that has died. Nothing
more is sent, requests in flight are cancelled, and the result says it was `stopped`: its records tell
which requests completed, which were cancelled and which were never sent.

`run_load_sync(..., processes=N)` spreads one run over N client processes (`llmstack.bench.sharded`) for
servers that one client process cannot keep busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from llmstack.bench.http import (
    HttpConnection,
    PreparedRequest,
    RawResponse,
    Target,
    parse_url,
    prepare_request,
)
from llmstack.bench.records import RequestRecord

__all__ = [
    "LoadPart",
    "LoadResult",
    "arrival_offsets",
    "mark_unfinished",
    "run_load",
    "run_load_sync",
    "run_part",
    "run_until_stopped",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
# True when the run must end now (a stop signal, a dead engine).
StopCheck = Callable[[], bool]

# Without a concurrency cap the number of connections an open loop needs is unknown; opening about one
# second's worth of arrivals up front keeps connection setup out of the first requests' latency.
_MAX_PREOPENED_UNCAPPED = 256
# Raw response bytes kept for parsing after the window: about 70k responses of 16 tokens, or 10k of 128.
DEFAULT_DEFER_PARSE_BYTES = 256 * 1024 * 1024
# A progress callback (a terminal bar) runs at most this often, and once more at the end.
_PROGRESS_INTERVAL_S = 0.1
# How often `should_stop` is asked.
_STOP_POLL_S = 0.05
# The errors of requests a stopped run did not finish.
CANCELLED = "cancelled: the load level was stopped"
NOT_SENT = "not sent: the load level was stopped"


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
    # `should_stop` ended the run before every request was done.
    stopped: bool = False

    @property
    def duration(self) -> float:
        return self.end - self.start

    def __repr__(self) -> str:
        # Short on purpose: asyncio formats the main task's result into exception messages on Python 3.11,
        # and the full repr of 100k records takes seconds.
        ok = sum(r.success for r in self.records)
        return (
            f"LoadResult({ok}/{len(self.records)} ok, {self.duration:.3f} s, concurrency={self.concurrency}, "
            f"request_rate={self.request_rate}, burstiness={self.burstiness}, stopped={self.stopped})"
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
    defer_parse_bytes: int = DEFAULT_DEFER_PARSE_BYTES,
    should_stop: StopCheck | None = None,
) -> LoadResult:
    """Send every payload to `base_url + endpoint` and return one record per payload (same order).

    `input_lens` optionally gives each prompt's expected token count (used when the server reports no usage).
    `defer_parse_bytes` bounds the raw response bytes held for parsing after the window; 0 parses every
    response as soon as it has ended. `should_stop` ends the run early (see the module's docstring).
    """
    validate_load(payloads, concurrency, request_rate, input_lens)
    offsets = (
        None if math.isinf(request_rate) else arrival_offsets(len(payloads), request_rate, burstiness, seed)
    )
    part = LoadPart(
        url=base_url.rstrip("/") + endpoint,
        payloads=list(payloads),
        indices=list(range(len(payloads))),
        offsets=offsets,
        concurrency=concurrency,
        api_key=api_key,
        timeout_s=timeout_s,
        input_lens=list(input_lens) if input_lens is not None else None,
        defer_parse_bytes=defer_parse_bytes,
    )
    records, start, end, stopped = await run_part(part, progress, should_stop=should_stop)
    return LoadResult(records, start, end, concurrency, request_rate, burstiness, stopped)


def validate_load(
    payloads: Sequence[dict[str, Any]],
    concurrency: int | None,
    request_rate: float,
    input_lens: Sequence[int | None] | None,
) -> None:
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1 or None, got {concurrency}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be positive, got {request_rate}")
    if input_lens is not None and len(input_lens) != len(payloads):
        raise ValueError("input_lens must have one entry per payload")


@dataclass(slots=True)
class LoadPart:
    """The requests one process sends: the whole run, or one shard of it (`llmstack.bench.sharded`)."""

    url: str
    payloads: list[dict[str, Any]]
    indices: list[int]  # each payload's index in the whole run: its record's `index`
    offsets: list[float] | None  # open loop: each payload's send time after the start; None: closed loop
    concurrency: int | None
    api_key: str | None
    timeout_s: float
    input_lens: list[int | None] | None
    defer_parse_bytes: int


# Called once the connections are open; blocks until the start and returns it (perf_counter seconds).
StartGate = Callable[[], float]


async def run_part(
    part: LoadPart,
    progress: ProgressCallback | None,
    gate: StartGate | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[list[RequestRecord], float, float, bool]:
    """Run `part`; return its records (in `part.payloads` order), the measured window, and whether
    `should_stop` ended it early."""
    target = parse_url(part.url)
    prepared = [prepare_request(target, payload, api_key=part.api_key) for payload in part.payloads]
    records = [
        RequestRecord(
            index=index,
            expected_input_tokens=part.input_lens[i] if part.input_lens is not None else None,
            expected_output_tokens=_requested_output_tokens(payload),
            stream=bool(payload.get("stream")),
        )
        for i, (index, payload) in enumerate(zip(part.indices, part.payloads, strict=True))
    ]
    counter = _Progress(len(records), progress)
    backlog = _Backlog(records, part.defer_parse_bytes)
    # Like vLLM, freeze the heap built so far; unlike vLLM, no collection at all inside the window: a pause
    # there delays every timestamp taken after it. A run makes no reference cycles worth collecting.
    gc.collect()
    gc.freeze()
    collector_was_on = gc.isenabled()
    gc.disable()
    run = _Run(target, prepared, records, part.timeout_s, counter, backlog, gate, should_stop)
    try:
        if part.offsets is None:
            workers = len(records) if part.concurrency is None else min(part.concurrency, len(records))
            start, end = await _closed_loop(run, workers)
        else:
            start, end = await _open_loop(run, part.offsets, part.concurrency)
    finally:
        # Also after an interruption: whatever did complete is parsed into its record.
        backlog.apply_all()
        if collector_was_on:
            gc.enable()
        gc.unfreeze()
    if run.stopped:
        mark_unfinished(records, end)
    sent = [r for r in records if r.error != NOT_SENT]
    failed = sum(not r.success for r in sent)
    if failed:
        logger.info("%d of %d requests failed", failed, len(sent))
    return records, start, end, run.stopped


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


def mark_unfinished(records: Sequence[RequestRecord], now: float) -> None:
    """After a stopped run: requests in flight were cancelled, the others were never sent."""
    for record in records:
        if record.done_at is not None or record.success:
            continue
        if record.sent_at is None:
            record.error = NOT_SENT
        else:
            record.done_at = now
            record.error = record.error or CANCELLED


def run_load_sync(*args: Any, processes: int = 1, **kwargs: Any) -> LoadResult:
    """`run_load` in a fresh event loop (uvloop when installed).

    `processes > 1` shards the requests over that many client processes (`llmstack.bench.sharded`), for
    machines where one process cannot keep up with the server.
    """
    if processes > 1:
        from llmstack.bench.sharded import run_load_processes

        return run_load_processes(*args, processes=processes, **kwargs)
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
    """Counts finished requests; calls the callback at most every `_PROGRESS_INTERVAL_S` and at the end.

    Unthrottled, a terminal progress bar would cost one write per request: at thousands of requests per
    second, a real share of the client's CPU.
    """

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback
        self._next_call = 0.0

    def step(self) -> None:
        self.done += 1
        if self.callback is None:
            return
        now = perf_counter()
        if now < self._next_call and self.done < self.total:
            return
        self._next_call = now + _PROGRESS_INTERVAL_S
        try:
            self.callback(self.done, self.total)
        except Exception:
            # A broken progress bar must not abort a benchmark.
            logger.exception("progress callback failed")
            self.callback = None


class _Backlog:
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
class _Run:
    target: Target
    prepared: list[PreparedRequest]
    records: list[RequestRecord]
    timeout_s: float
    counter: _Progress
    backlog: _Backlog
    gate: StartGate | None
    should_stop: StopCheck | None = None
    stopped: bool = False

    async def start(self) -> float:
        """The start of the window: now, or the time the gate gives (shared by every shard)."""
        if self.gate is None:
            return perf_counter()
        start = self.gate()
        delay = start - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        return start


async def _closed_loop(run: _Run, workers: int) -> tuple[float, float]:
    connections = await _open_connections(run.target, workers, run.timeout_s)
    prepared, records, timeout_s, backlog, counter = (
        run.prepared, run.records, run.timeout_s, run.backlog, run.counter
    )  # fmt: skip
    # One shared iterator: next() never yields to the loop, so no index is taken twice.
    pending = iter(range(len(records)))

    should_stop = run.should_stop

    async def worker(connection: HttpConnection) -> None:
        for i in pending:
            backlog.add(i, await connection.send_deferred(prepared[i], records[i], timeout_s=timeout_s))
            counter.step()
            # A failure may mean a dead server, where the rest would fail at once: ask now, not in 50 ms.
            if should_stop is not None and records[i].error is not None and should_stop():
                return

    try:
        start = await run.start()
        work = asyncio.gather(*(worker(c) for c in connections))
        # Workers that saw the stop themselves return early, before the watcher may have.
        run.stopped = await run_until_stopped(work, run.should_stop) or any(
            r.sent_at is None for r in records
        )
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


async def _open_loop(run: _Run, offsets: list[float], cap: int | None) -> tuple[float, float]:
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
        run.counter.step()

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
        start = await run.start()
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
