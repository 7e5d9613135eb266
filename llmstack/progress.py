"""The run's one status line: what it is waiting for or doing, and how far it got.

On a terminal it is a single live line (rich), rewritten in place at most a few times a second and erased
before anything else is printed (the console log handler and the engine echo call `clear()`). Elsewhere (a
file, a pipe, CI) it is a plain log line every `plain_every_s`, and only when it says something new: an
unchanged line is not repeated. Long text (an engine's log line) is cut at a word boundary, never mid-word.

Updates come from the caller's own loop (the supervisor's readiness poll, the benchmark client's progress
callback, which runs at most every 0.1 s): no thread of its own, and a live line costs one terminal write
per refresh, so the display never competes with the benchmark client.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

logger = logging.getLogger("llmstack.progress")

PLAIN_EVERY_S = 10.0
LIVE_REFRESH_S = 0.25
PLAIN_WIDTH = 160
_ELLIPSIS = "…"

# The live line being shown, so that whoever prints something else can erase it first.
_active: StatusLine | None = None


def cut_at_word(text: str, width: int) -> str:
    """`text` (whitespace squeezed) in at most `width` characters; longer, it ends at a word boundary with
    an ellipsis. A first word longer than the room gives the ellipsis alone: never a piece of a word."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    room = width - len(_ELLIPSIS) - 1
    kept = ""
    for word in text.split(" "):
        candidate = f"{kept} {word}" if kept else word
        if len(candidate) > room:
            break
        kept = candidate
    return f"{kept} {_ELLIPSIS}" if kept else _ELLIPSIS


def render(
    phase: str,
    *,
    elapsed_s: float | None = None,
    done: int | None = None,
    total: int | None = None,
    rate: float | None = None,
    ttft_s: float | None = None,
    note: str | None = None,
    width: int = PLAIN_WIDTH,
) -> str:
    """One status line: `[elapsed] phase: done/total requests, rate req/s, TTFT ms — note`, at most `width`
    wide (`ttft_s`: the latest finished request's)."""
    head = f"[{elapsed_s:4.0f} s] {phase}" if elapsed_s is not None else phase
    parts = []
    if done is not None:
        parts.append(f"{done}/{total} requests" if total else f"{done} requests")
    if rate is not None:
        parts.append(f"{rate:.1f} req/s")
    if ttft_s is not None:
        parts.append(f"TTFT {ttft_s * 1000:.0f} ms")
    line = head + (": " + ", ".join(parts) if parts else "")
    if note:
        room = width - len(line) - 3
        if room >= 8:
            line += " — " + cut_at_word(note, room)
    return line


class StatusLine:
    """One phase's status. `update()` as often as you like: it draws at most every `LIVE_REFRESH_S` on a
    terminal, and logs only a changed line at most every `plain_every_s` elsewhere. `close()` when done."""

    def __init__(
        self,
        phase: str,
        *,
        stream: TextIO | None = None,
        live: bool | None = None,
        plain_every_s: float | None = None,
        emit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.phase = phase
        self.stream = stream if stream is not None else sys.stderr
        self.live = _is_terminal(self.stream) if live is None else live
        # LLMSTACK_PROGRESS_EVERY_S: how often a log (not a terminal) gets the status, 10 s by default.
        every = os.environ.get("LLMSTACK_PROGRESS_EVERY_S")
        self.plain_every_s = plain_every_s if plain_every_s is not None else float(every or PLAIN_EVERY_S)
        self.emit = emit or (lambda text: logger.info("%s", text))
        self.clock = clock
        self.started = clock()
        self._next_draw = self.started
        self._next_plain = self.started + self.plain_every_s
        self._last_plain_key: tuple[Any, ...] | None = None
        self._rate_mark: tuple[float, int] | None = None
        self._rate: float | None = None
        self._ttft_s: float | None = None
        self._live: Any = None  # rich.live.Live while the line is on screen

    def update(
        self,
        *,
        done: int | None = None,
        total: int | None = None,
        note: str | None = None,
        phase: str | None = None,
        ttft_s: float | None = None,
    ) -> None:
        now = self.clock()
        if ttft_s is not None:
            self._ttft_s = ttft_s
        if phase is not None:
            self.phase = phase
        if done is not None:
            self._update_rate(now, done)
        if self.live:
            if now >= self._next_draw or (total and done == total):
                self._next_draw = now + LIVE_REFRESH_S
                self._draw(self._line(now, done, total, note, self._width()))
            return
        if now < self._next_plain:
            return
        self._next_plain = now + self.plain_every_s
        key = (self.phase, done, total, " ".join(note.split()) if note else None)
        if key == self._last_plain_key:
            return  # nothing new to say: an unchanged line is not repeated
        self._last_plain_key = key
        self.emit(self._line(now, done, total, note, PLAIN_WIDTH))

    def clear(self) -> None:
        """Erase the live line (it comes back at the next update)."""
        global _active
        live, self._live = self._live, None
        if live is not None:
            live.stop()
        if _active is self:
            _active = None

    close = clear

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, now: float, done: int | None, total: int | None, note: str | None, width: int) -> str:
        return render(
            self.phase, elapsed_s=now - self.started, done=done, total=total, rate=self._rate,
            ttft_s=self._ttft_s, note=note, width=width,
        )  # fmt: skip

    def _update_rate(self, now: float, done: int) -> None:
        """Requests per second over the last second or so (the current rate, not the average)."""
        if self._rate_mark is None or done < self._rate_mark[1]:
            self._rate_mark = (now, done)
            return
        since, then = self._rate_mark
        if now - since >= 1.0:
            self._rate = (done - then) / (now - since)
            self._rate_mark = (now, done)

    def _width(self) -> int:
        try:
            return max(20, os.get_terminal_size(self.stream.fileno()).columns - 1)
        except (OSError, ValueError, AttributeError):
            return 100

    def _draw(self, line: str) -> None:
        global _active
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        if self._live is None:
            if _active is not None and _active is not self:
                _active.clear()
            console = Console(file=self.stream, force_terminal=True, highlight=False)
            self._live = Live(
                Text(line, no_wrap=True, overflow="ellipsis"),
                console=console,
                auto_refresh=False,  # no refresh thread: drawn from the caller's loop only
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start(refresh=True)
            _active = self
            return
        self._live.update(Text(line, no_wrap=True, overflow="ellipsis"), refresh=True)


def clear() -> None:
    """Erase the live status line, if one is shown: before printing anything else to the terminal."""
    if _active is not None:
        _active.clear()


def _is_terminal(stream: TextIO) -> bool:
    if os.environ.get("LLMSTACK_PROGRESS", "").lower() in {"0", "off", "plain"}:
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def closing_line(summary: dict[str, Any]) -> str:
    """The run's last console line: where its results are, its outcome, and each level's headline figures
    (output tokens/s, TTFT p50, requests ok/failed), so that nobody scrolls back to find them."""
    status = summary.get("status", "?")
    line = f"results in {summary.get('run_dir')} ({status})"
    bench = summary.get("benchmark") or {}
    figures = [_level_figures(level) for level in bench.get("levels") or []]
    if (offline := bench.get("result")) is not None:
        figures.append(_offline_figures(offline))
    if len(figures) > 4:
        figures = [*figures[:3], f"… {len(figures) - 4} more …", figures[-1]]
    return line + (": " + "; ".join(figures) if figures else "")


def _level_figures(level: dict[str, Any]) -> str:
    parts = []
    if level.get("output_throughput") is not None:
        parts.append(f"{level['output_throughput']:.1f} output tok/s")
    if level.get("median_ttft_ms") is not None:
        parts.append(f"TTFT p50 {level['median_ttft_ms']:.1f} ms")
    parts.append(f"{level.get('completed') or 0} ok / {level.get('failed') or 0} failed")
    if level.get("complete") is False:
        parts.append("cut short")
    return f"{level.get('label')}: " + ", ".join(parts)


def _offline_figures(result: dict[str, Any]) -> str:
    tokens, requests = result.get("output_tokens_per_second"), result.get("requests_per_second")
    shown = [f"{tokens:.1f} output tok/s" if tokens is not None else None,
             f"{requests:.2f} req/s" if requests is not None else None]  # fmt: skip
    return "offline: " + ", ".join(s for s in shown if s)
