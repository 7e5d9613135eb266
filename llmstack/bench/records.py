"""One record per benchmark request, and their JSON-lines form (`requests.jsonl`).

All times are `time.perf_counter()` seconds taken in the benchmark process (Linux: CLOCK_MONOTONIC). They
are only meaningful relative to each other (and to the measured window of the same run), not as dates.
`requests.jsonl` adds each one's wall-clock date beside it (`sent_at_epoch`, ...: Unix seconds), converted
through one (wall clock, perf_counter) pair read when the file is written: the hot path reads no second clock.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EPOCH_FIELDS", "RequestRecord", "WallClock", "iter_records", "load_records", "records_jsonl"]

# The record's single times that `requests.jsonl` also writes as wall-clock dates, as `<name>_epoch`.
EPOCH_FIELDS = ("scheduled_at", "sent_at", "first_content_at", "done_at")


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request.

    Timing fields:
      - `scheduled_at`: when the open-loop schedule wanted the request sent (None in closed loop). The client
        queue time is `sent_at - scheduled_at`: waiting for a free connection under a concurrency cap,
        reconnecting, and event-loop lag.
      - `sent_at`: just before the request bytes were written to an open connection.
      - `chunk_times`: arrival time of every SSE event that carried generated text (a role-only chunk, an
        empty text, the final usage-only chunk and `[DONE]` are not in it). The arrival time of an event is
        the time of the socket read that completed it: on Linux over plain TCP, the kernel's receive time
        of that read's data (see `llmstack.bench.http`).
      - `chunk_token_counts`: tokens carried by each entry of `chunk_times`, when the server said so
        (per-chunk cumulative `usage` from `stream_options.continuous_usage_stats`, or `logprobs`); else
        None.
      - `first_content_at`: `chunk_times[0]` for streams; None for non-streaming requests.
      - `done_at`: the response body ended (or the request failed).

    Token fields come from the server's `usage` and are None when it sent none; `expected_*` are what the
    caller asked for (dataset prompt length, `max_tokens`).
    """

    index: int
    expected_input_tokens: int | None = None
    expected_output_tokens: int | None = None
    stream: bool = True
    scheduled_at: float | None = None
    sent_at: float | None = None
    first_content_at: float | None = None
    done_at: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    chunk_token_counts: list[int] | None = None
    output_text: str = ""
    # Reasoning models stream their thinking apart from the answer; it is generated text all the same.
    reasoning_text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    http_status: int | None = None
    success: bool = False
    error: str | None = None

    @property
    def client_queue_time(self) -> float | None:
        if self.scheduled_at is None or self.sent_at is None:
            return None
        return self.sent_at - self.scheduled_at

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> RequestRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        # Unknown keys come from newer writers; dropping them keeps old readers working.
        return cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class WallClock:
    """One reading of the wall clock and of `perf_counter` together: it turns any perf_counter time of this
    boot into a Unix date. Both clocks advance at the same (NTP-slewed) rate, so the offset holds until the
    wall clock is stepped; a pair read just before writing reflects the latest step."""

    epoch: float
    perf: float

    @classmethod
    def now(cls) -> WallClock:
        before = time.perf_counter()
        epoch = time.time()
        after = time.perf_counter()
        return cls(epoch=epoch, perf=(before + after) / 2)

    def epoch_of(self, perf_time: float | None) -> float | None:
        return None if perf_time is None else round(self.epoch + (perf_time - self.perf), 6)


def records_jsonl(records: Iterable[RequestRecord], wall_clock: WallClock | None = None) -> str:
    """One JSON object per line (`requests.jsonl`); writing it is the caller's business. With `wall_clock`,
    each of EPOCH_FIELDS also as a Unix date (`sent_at_epoch`, ...), beside the perf_counter time."""

    def line(record: RequestRecord) -> str:
        data = record.to_dict()
        if wall_clock is not None:
            data.update({f"{name}_epoch": wall_clock.epoch_of(data[name]) for name in EPOCH_FIELDS})
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"

    return "".join(line(record) for record in records)


def iter_records(path: str | os.PathLike[str]) -> Iterator[RequestRecord]:
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield RequestRecord.from_dict(json.loads(line))


def load_records(path: str | os.PathLike[str]) -> list[RequestRecord]:
    return list(iter_records(path))
