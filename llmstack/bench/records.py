"""One record per benchmark request, and their JSON-lines form (`requests.jsonl`).

All times are `time.perf_counter()` seconds taken in the benchmark process. They are only meaningful relative
to each other (and to the measured window of the same run), never as wall-clock dates.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RequestRecord", "iter_records", "load_records", "records_jsonl"]


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


def records_jsonl(records: Iterable[RequestRecord]) -> str:
    """One JSON object per line (`requests.jsonl`); writing it is the caller's business."""
    return "".join(
        json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n" for record in records
    )


def iter_records(path: str | os.PathLike[str]) -> Iterator[RequestRecord]:
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield RequestRecord.from_dict(json.loads(line))


def load_records(path: str | os.PathLike[str]) -> list[RequestRecord]:
    return list(iter_records(path))
