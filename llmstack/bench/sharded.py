"""One load run spread over several client processes, for servers faster than one client process.

The requests are dealt round-robin into `processes` shards. Each shard runs in its own spawned process with
its own event loop and connections (`loadgen.run_part`), and a share of the concurrency: closed loop, each
process keeps its share of the connections busy; open loop, each sends its own requests at their times in
the one arrival schedule of the whole run (the same schedule one process would follow). All processes
start together: each opens its connections, reports ready, and waits for a start time the coordinator
hands out.

Records come back to this process and are put in payload order; the window runs from the common start to
the last response of any process. Timestamps of different processes are comparable because
`time.perf_counter()` is a system-wide clock on Linux (CLOCK_MONOTONIC), macOS and Windows.

`should_stop` is asked here; when it turns true, every shard is told to stop (its in-flight requests are
cancelled) and sends back what it has. Shards ignore Ctrl-C: a terminal's SIGINT reaches the whole process
group, and it is this process that decides.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from time import perf_counter
from typing import Any

from llmstack.bench.loadgen import (
    DEFAULT_DEFER_PARSE_BYTES,
    LoadPart,
    LoadResult,
    ProgressCallback,
    StopCheck,
    arrival_offsets,
    validate_load,
)
from llmstack.bench.records import RequestRecord

__all__ = ["run_load_processes", "split_evenly"]

logger = logging.getLogger(__name__)

# Between "all shards are ready" and the common start: enough for every process to receive the start time.
_START_LEAD_S = 0.05
_READY_TIMEOUT_S = 300.0
_PROGRESS_POLL_S = 0.1


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers that differ by at most one, larger ones first."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def run_load_processes(
    base_url: str,
    payloads: Sequence[dict[str, Any]],
    *,
    processes: int,
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
    """`loadgen.run_load` over `processes` client processes (fewer if there are fewer requests or slots)."""
    import multiprocessing

    validate_load(payloads, concurrency, request_rate, input_lens)
    count = len(payloads)
    processes = max(1, min(processes, count, concurrency or count))
    offsets = None if math.isinf(request_rate) else arrival_offsets(count, request_rate, burstiness, seed)
    caps = split_evenly(concurrency, processes) if concurrency is not None else [None] * processes
    url = base_url.rstrip("/") + endpoint
    parts = []
    for k in range(processes):
        indices = list(range(k, count, processes))
        parts.append(
            LoadPart(
                url=url,
                payloads=[payloads[i] for i in indices],
                indices=indices,
                offsets=[offsets[i] for i in indices] if offsets is not None else None,
                concurrency=caps[k],
                api_key=api_key,
                timeout_s=timeout_s,
                input_lens=[input_lens[i] for i in indices] if input_lens is not None else None,
                defer_parse_bytes=defer_parse_bytes // processes,
            )
        )

    # Spawn, not fork: the parent may hold threads (tokenizers, a progress bar) that fork would break.
    context = multiprocessing.get_context("spawn")
    done_counts = context.Array("q", processes, lock=False)  # each shard writes only its own slot
    pipes: list[Connection] = []
    workers = []
    stop_progress = threading.Event()
    reporter: threading.Thread | None = None
    try:
        for k, part in enumerate(parts):
            parent_end, child_end = context.Pipe()
            worker = context.Process(
                target=_shard_main, args=(child_end, done_counts, k, part), name=f"llmstack-load-{k}"
            )
            worker.start()
            child_end.close()
            pipes.append(parent_end)
            workers.append(worker)
        for k, pipe in enumerate(pipes):
            _expect(pipe, "ready", k, _READY_TIMEOUT_S)
        start = perf_counter() + _START_LEAD_S
        for pipe in pipes:
            pipe.send(start)
        if progress is not None:
            reporter = threading.Thread(
                target=_report_progress, args=(done_counts, count, progress, stop_progress), daemon=True
            )
            reporter.start()
        records: list[RequestRecord | None] = [None] * count
        end = start
        stopped = _wait_done(pipes, should_stop)
        for k, pipe in enumerate(pipes):
            shard_records, _, shard_end, shard_stopped = _expect(pipe, "done", k, None)
            for record in shard_records:
                records[record.index] = record
            end = max(end, shard_end)
            stopped = stopped or shard_stopped
    finally:
        stop_progress.set()
        if reporter is not None:
            reporter.join()
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
                worker.join()
        for pipe in pipes:
            pipe.close()
    if progress is not None and not stopped:
        progress(count, count)
    assert all(r is not None for r in records)
    return LoadResult(records, start, end, concurrency, request_rate, burstiness, stopped)  # type: ignore[arg-type]


def _wait_done(pipes: list[Connection], should_stop: StopCheck | None) -> bool:
    """Until every shard has its result ready; tells them all to stop if `should_stop` turns true first.
    True if they were told to stop."""
    from multiprocessing.connection import wait

    pending = list(pipes)
    while pending:
        ready = wait(pending, timeout=0.05)
        pending = [pipe for pipe in pending if pipe not in ready]
        if pending and should_stop is not None and should_stop():
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.send(("stop",))
            return True
    return False


def _expect(pipe: Connection, kind: str, shard: int, timeout_s: float | None) -> tuple[Any, ...]:
    if timeout_s is not None and not pipe.poll(timeout_s):
        raise RuntimeError(f"load shard {shard} was not {kind} after {timeout_s:g} s")
    try:
        message = pipe.recv()
    except EOFError:
        raise RuntimeError(f"load shard {shard} exited before it was {kind}") from None
    if message[0] == "error":
        raise RuntimeError(f"load shard {shard} failed: {message[1]}")
    if message[0] != kind:
        raise RuntimeError(f"load shard {shard}: expected {kind!r}, got {message[0]!r}")
    return tuple(message[1:])


def _report_progress(done_counts: Any, total: int, progress: ProgressCallback, stop: threading.Event) -> None:
    while not stop.wait(_PROGRESS_POLL_S):
        done = sum(done_counts)
        if done < total:
            try:
                progress(done, total)
            except Exception:
                logger.exception("progress callback failed")
                return


def _shard_main(pipe: Connection, done_counts: Any, shard: int, part: LoadPart) -> None:
    """Entry point of a shard process."""
    import asyncio
    import signal

    from llmstack.bench.loadgen import _loop_factory, run_part

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def gate() -> float:
        pipe.send(("ready",))
        return pipe.recv()

    def progress(done: int, total: int) -> None:
        done_counts[shard] = done

    def should_stop() -> bool:
        # The only message after the start time is "stop"; a closed pipe (coordinator gone) reads as one.
        return pipe.poll()

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            records, start, end, stopped = runner.run(run_part(part, progress, gate, should_stop))
        pipe.send(("done", records, start, end, stopped))
    except BaseException as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        pipe.close()
