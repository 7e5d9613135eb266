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

A closed loop may run for a time instead (`duration_s`, wrk's `-d`): the workers cycle through the payloads
in order until `duration_s` has passed since the start. A request sent before that deadline runs to
completion and counts: the window ends when the last response has finished. (wrk instead drops what is in
flight at the deadline and divides by the duration; `completed_by(result, deadline)` gives that count.)

`should_stop` (polled every 50 ms) ends a run early: a stop signal, or an engine that has died. Nothing
more is sent, requests in flight are cancelled, and the result says it was `stopped`: its records tell
which requests completed, which were cancelled and which were never sent.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmstack.bench.http import parse_url, prepare_request
from llmstack.bench.loops import (
    Backlog,
    Progress,
    ProgressCallback,
    Run,
    StopCheck,
    closed_loop,
    open_loop,
    run_until_stopped,
    timed_loop,
)
from llmstack.bench.records import RequestRecord

__all__ = [
    "LoadResult",
    "ProgressCallback",
    "StopCheck",
    "arrival_offsets",
    "completed_by",
    "mark_unfinished",
    "run_load",
    "run_load_sync",
    "run_until_stopped",
]

logger = logging.getLogger(__name__)

# Raw response bytes kept for parsing after the window: about 70k responses of 16 tokens, or 10k of 128.
DEFAULT_DEFER_PARSE_BYTES = 256 * 1024 * 1024
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
    duration_s: float | None = None,
) -> LoadResult:
    """Send every payload to `base_url + endpoint` and return one record per payload (same order); with
    `duration_s`, a closed loop of `concurrency` workers sends the payloads in turn until then, one record
    per request sent.

    `input_lens` optionally gives each prompt's expected token count (used when the server reports no usage).
    `defer_parse_bytes` bounds the raw response bytes held for parsing after the window; 0 parses every
    response as soon as it has ended. `should_stop` ends the run early (see the module's docstring).
    """
    validate_load(payloads, concurrency, request_rate, input_lens, duration_s)
    target = parse_url(base_url.rstrip("/") + endpoint)
    prepared = [prepare_request(target, payload, api_key=api_key) for payload in payloads]
    templates = [
        RequestRecord(
            index=i,
            expected_input_tokens=input_lens[i] if input_lens is not None else None,
            expected_output_tokens=_requested_output_tokens(payload),
            stream=bool(payload.get("stream")),
        )
        for i, payload in enumerate(payloads)
    ]
    # A timed run makes its records as it sends; a counted one has them all before the start.
    records = [] if duration_s is not None else templates
    counter = Progress(len(records) if duration_s is None else None, progress)
    backlog = Backlog(records, defer_parse_bytes)
    # Like vLLM, freeze the heap built so far; unlike vLLM, no collection at all inside the window: a pause
    # there delays every timestamp taken after it. A run makes no reference cycles worth collecting.
    gc.collect()
    gc.freeze()
    collector_was_on = gc.isenabled()
    gc.disable()
    run = Run(target, prepared, records, timeout_s, counter, backlog, should_stop)
    try:
        if duration_s is not None:
            assert concurrency is not None
            start, end = await timed_loop(run, templates, concurrency, duration_s)
        elif math.isinf(request_rate):
            workers = len(records) if concurrency is None else min(concurrency, len(records))
            start, end = await closed_loop(run, workers)
        else:
            offsets = arrival_offsets(len(payloads), request_rate, burstiness, seed)
            start, end = await open_loop(run, offsets, concurrency)
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
    return LoadResult(records, start, end, concurrency, request_rate, burstiness, run.stopped)


def validate_load(
    payloads: Sequence[dict[str, Any]],
    concurrency: int | None,
    request_rate: float,
    input_lens: Sequence[int | None] | None,
    duration_s: float | None = None,
) -> None:
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1 or None, got {concurrency}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be positive, got {request_rate}")
    if input_lens is not None and len(input_lens) != len(payloads):
        raise ValueError("input_lens must have one entry per payload")
    if duration_s is not None:
        if not duration_s > 0:
            raise ValueError(f"duration_s must be positive, got {duration_s}")
        if concurrency is None or not math.isinf(request_rate):
            raise ValueError("a run of fixed duration is a closed loop with a concurrency")
        if not payloads:
            raise ValueError("no payloads")


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


def run_load_sync(*args: Any, **kwargs: Any) -> LoadResult:
    """`run_load` in a fresh event loop (uvloop when installed)."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_load(*args, **kwargs))


def completed_by(result: LoadResult, deadline: float) -> int:
    """Successful requests that had finished by `deadline` (perf_counter seconds): wrk's count."""
    return sum(1 for r in result.records if r.success and r.done_at is not None and r.done_at <= deadline)


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
