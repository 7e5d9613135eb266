"""A closed loop that runs for a fixed time instead of a fixed number of requests (wrk's `-d`).

`connections` workers, each on its own keep-alive connection, send the next payload (cycling through them
in order) as soon as their previous request ends, until `duration_s` has passed since the start. A request
sent before the deadline runs to completion and counts, as in `loadgen.run_load`: the measured window ends
when the last response has finished. (wrk instead drops what is in flight at the deadline and divides by
the duration; `completed_by(result, deadline)` gives that count.)

Built from the same connection class as `loadgen`, so both measure with the same timestamps.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

from llmstack.bench.http import HttpConnection, parse_url, prepare_request
from llmstack.bench.loadgen import LoadResult, mark_unfinished, run_until_stopped
from llmstack.bench.records import RequestRecord

__all__ = ["completed_by", "run_for_duration", "run_for_duration_sync"]

logger = logging.getLogger(__name__)

# Called with (requests finished, seconds since the start).
TimedProgress = Callable[[int, float], None]


async def run_for_duration(
    base_url: str,
    payloads: Sequence[dict[str, Any]],
    *,
    endpoint: str,
    connections: int,
    duration_s: float,
    api_key: str | None = None,
    timeout_s: float,
    input_lens: Sequence[int | None] | None = None,
    progress: TimedProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> LoadResult:
    """Records in send order; `should_stop` ends the run early (a stop signal, or a server that has died,
    where every further request would fail at once): nothing more is sent, requests in flight are
    cancelled, and the result is marked `stopped`."""
    if connections < 1:
        raise ValueError(f"connections must be >= 1, got {connections}")
    if not payloads:
        raise ValueError("no payloads")
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    target = parse_url(base_url.rstrip("/") + endpoint)
    prepared = [prepare_request(target, payload, api_key=api_key) for payload in payloads]
    expected_out = [_requested_output_tokens(payload) for payload in payloads]
    records: list[RequestRecord] = []
    pool = [HttpConnection(target, connect_timeout_s=timeout_s) for _ in range(connections)]
    opened = await asyncio.gather(*(c.connect() for c in pool), return_exceptions=True)
    errors = [r for r in opened if isinstance(r, BaseException)]
    if errors:
        # Not fatal: each request reconnects when it must and records a failure itself.
        logger.warning("%d of %d connections failed to open: %s", len(errors), connections, errors[0])
    finished = 0
    told_to_stop = False

    async def worker(connection: HttpConnection) -> None:
        nonlocal finished, told_to_stop
        while perf_counter() < deadline:
            # Asked before every send too (not only every 50 ms): against a dead server they fail at once.
            if should_stop is not None and should_stop():
                told_to_stop = True
                return
            i = len(records)
            j = i % len(prepared)
            record = RequestRecord(
                index=i,
                expected_input_tokens=input_lens[j] if input_lens is not None else None,
                expected_output_tokens=expected_out[j],
                stream=prepared[j].stream,
            )
            records.append(record)
            await connection.send(prepared[j], record, timeout_s=timeout_s)
            finished += 1
            if progress is not None:
                progress(finished, perf_counter() - start)

    gc.collect()
    gc.freeze()
    start = perf_counter()
    deadline = start + duration_s
    try:
        cancelled = await run_until_stopped(asyncio.gather(*(worker(c) for c in pool)), should_stop)
        stopped = cancelled or told_to_stop
        end = perf_counter()
    finally:
        gc.unfreeze()
        for connection in pool:
            connection.close()
        await asyncio.sleep(0)  # let the transports run connection_lost
    if stopped:
        mark_unfinished(records, end)
    return LoadResult(records, start, end, connections, math.inf, 1.0, stopped)


def run_for_duration_sync(*args: Any, **kwargs: Any) -> LoadResult:
    """`run_for_duration` in a fresh event loop (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_for_duration(*args, **kwargs))


def completed_by(result: LoadResult, deadline: float) -> int:
    """Successful requests that had finished by `deadline` (perf_counter seconds): wrk's count."""
    return sum(1 for r in result.records if r.success and r.done_at is not None and r.done_at <= deadline)


def _requested_output_tokens(payload: dict[str, Any]) -> int | None:
    for key in ("max_tokens", "max_completion_tokens"):
        value = payload.get(key)
        if isinstance(value, int):
            return value
    return None
