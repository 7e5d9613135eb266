"""Stop requests (Ctrl-C, SIGTERM, SIGHUP) captured as a flag and acted on where a run can stop cleanly.

A signal handler that raises is not safe here: the benchmark runs inside an event loop (uvloop), whose
callbacks catch and log the exception and go on, so the run would continue as if nothing had happened. As
uvicorn does (`capture_signals` / `handle_exit`), the handler only records the signal; the launcher's loops
(waiting for readiness, serving, every load level, the offline phase, between grid jobs) look at the flag
and stop: `check()` raises `Interrupted`, whose exit status is 128 + the signal's number (130, 143, 129).

The first signal is the one reported; later ones are ignored, so that teardown always finishes (nothing is
left running). `capture()` installs the handlers for the rest of the process (a grid runs several jobs, and
a signal between them must stop the grid too).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from llmstack.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_received: list[int] = []


def _record(signum: int, frame: object) -> None:
    if not _received:
        _received.append(signum)


def capture() -> None:
    """Record stop signals from now on (main thread only; elsewhere a no-op). Idempotent."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


@contextlib.contextmanager
def captured() -> Iterator[None]:
    """`capture()` for a block, restoring the previous handlers and the flag after it (tests, embedding)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    saved = list(_received)
    capture()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received[:] = saved


def is_captured() -> bool:
    """Whether stop signals are being recorded as a flag (rather than raising where they land)."""
    return signal.getsignal(signal.SIGINT) is _record


def received() -> int | None:
    """The first stop signal received, or None."""
    return _received[0] if _received else None


def requested() -> bool:
    return bool(_received)


def check() -> None:
    """Raise `Interrupted` if a stop signal has been received."""
    if _received:
        raise interrupted()


def interrupted(where: str | None = None) -> Interrupted:
    signum = _received[0] if _received else signal.SIGINT
    return Interrupted(signum, where)


def sleep(seconds: float, step_s: float = 0.1) -> None:
    """time.sleep that ends early (raising `Interrupted`) when a stop signal arrives."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        check()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(step_s, left))


def stop_requested_or(condition: Callable[[], bool] | None) -> Callable[[], bool]:
    """A `should_stop` for the load generator: a stop signal, or `condition` (e.g. the engine died)."""
    if condition is None:
        return requested
    return lambda: requested() or condition()


@contextlib.contextmanager
def deferred(redeliver: bool = False) -> Iterator[None]:
    """Where stop signals raise (not captured as a flag), hold Ctrl-C and SIGTERM until the block is done,
    then raise Interrupted once; with `redeliver`, send the first held signal again to the handler that was
    in place (KeyboardInterrupt for Ctrl-C by default). Where they are captured, nothing raises mid-way:
    the flag is looked at after the block."""
    if threading.current_thread() is not threading.main_thread() or is_captured():
        yield
        return
    pending: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending and redeliver:
            signal.raise_signal(pending[0])
        elif pending:
            raise Interrupted(pending[0], "teardown")


def reset() -> None:
    """Forget a received signal (tests only)."""
    _received.clear()
