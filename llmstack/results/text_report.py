"""Text reports: a compact table of load levels, and the seed script's report with correct arithmetic.

Functions return strings; printing is the caller's business.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from llmstack.bench.metrics import RequestMetrics, TokenCounter, request_metrics
from llmstack.bench.records import RequestRecord

__all__ = [
    "TABLE_COLUMNS",
    "format_load_level",
    "format_seed_report",
    "format_table",
    "output_token_count_line",
]

# (header, summary key, decimals). Latencies are in ms.
TABLE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("ok", "completed", 0),
    ("fail", "failed", 0),
    ("dur_s", "duration", 2),
    ("req/s", "request_throughput", 2),
    ("out_tok/s", "output_throughput", 1),
    ("tot_tok/s", "total_token_throughput", 1),
    ("ttft_mean", "mean_ttft_ms", 1),
    ("ttft_p50", "p50_ttft_ms", 1),
    ("ttft_p99", "p99_ttft_ms", 1),
    ("tpot_mean", "mean_tpot_ms", 2),
    ("tpot_p99", "p99_tpot_ms", 2),
    ("itl_p99", "p99_itl_ms", 2),
    ("e2el_mean", "mean_e2el_ms", 1),
)


def _cell(value: Any, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if decimals == 0:
        return str(int(value))
    return f"{value:.{decimals}f}"


def format_table(summaries: Sequence[Mapping[str, Any]], labels: Sequence[str] | None = None) -> str:
    """One row per load level, fixed width, latencies in ms; "-" where a value is undefined."""
    labels = list(labels) if labels is not None else [str(i) for i in range(len(summaries))]
    if len(labels) != len(summaries):
        raise ValueError("one label per summary")
    header = ["load", *(name for name, _, _ in TABLE_COLUMNS)]
    rows = [
        [label, *(_cell(summary.get(key), decimals) for _, key, decimals in TABLE_COLUMNS)]
        for label, summary in zip(labels, summaries, strict=True)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    lines.append("(latencies in ms; throughputs over successful requests)")
    return "\n".join(lines)


def format_load_level(summary: Mapping[str, Any], label: str = "") -> str:
    return format_table([summary], [label or _default_label(summary)])


def _default_label(summary: Mapping[str, Any]) -> str:
    rate = summary.get("request_rate")
    concurrency = summary.get("max_concurrency")
    if rate not in (None, "inf"):
        return f"rate={rate}" + (f",c={concurrency}" if concurrency else "")
    return f"c={concurrency}" if concurrency else "all"


def _percentile(values: Sequence[float], p: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), p))


def format_seed_report(
    records: Sequence[RequestRecord],
    start: float,
    end: float,
    *,
    concurrency: int | None,
    request_rate: float | None = None,
    count_tokens: TokenCounter | None = None,
) -> str:
    """The report of ipex-llm's `vllm_online_benchmark.py`, from the same records and definitions.

    Fixed against the seed: token throughput counts the tokens successful requests actually produced (not
    `requests * max_tokens`); next-token latency is per token, `(last chunk - first chunk) / (tokens - 1)` per
    request (the seed averaged chunk gaps, which is per chunk); requests with one token have no next token
    instead of crashing the report; failures are reported, not hidden. Added: a last line saying which
    output token count the figures use, and why the tokenizer's re-count differs (`output_token_count_line`).
    """
    per_request = [request_metrics(r, count_tokens) for r in records]
    ok = [m for m in per_request if m.success]
    duration = end - start
    if concurrency is not None:
        load = f"with {concurrency} concurrent requests"
    elif request_rate is not None and not math.isinf(request_rate):
        load = f"at {request_rate:g} requests/s"
    else:
        load = "sent at once"
    lines = [f"Total time for {len(records)} requests {load}: {duration:.2f} seconds."]

    response_times = [
        r.done_at - r.sent_at
        for r in records
        if r.success and r.done_at is not None and r.sent_at is not None
    ]
    lines.append(_seconds_line("Average response time", response_times))
    output_tokens = sum(m.output_tokens or 0 for m in ok)
    throughput = f"{output_tokens / duration:.2f} tokens/s." if duration > 0 else "n/a."
    lines.append(f"Token throughput: {throughput}")
    lines += _latency_lines("first token latency", [m.ttft for m in ok if m.ttft is not None])
    lines += _latency_lines("next token latency", [m.tpot for m in ok if m.tpot is not None])
    failed = [r for r in records if not r.success]
    if failed:
        lines.append(f"Failed requests: {len(failed)} of {len(records)} (first error: {failed[0].error}).")
    # Last: it speaks of "every figure above", and result.json's token keys need it to be read.
    lines.append(_token_count_line(records, per_request, tokenizer=count_tokens is not None))
    return "\n".join(lines)


# How each source of a request's output token count (RequestMetrics.output_tokens_source) reads in a sentence.
_SOURCES = {
    "usage": "by the server (usage.completion_tokens)",
    "chunk_usage": "by the server, chunk by chunk (no final usage)",
    "tokenizer": "by the model's tokenizer on the generated text (the server sent no usage)",
    "chunk_count": "as text chunks (no usage, no tokenizer: a lower bound)",
    "unknown": "not at all (no usage, no tokenizer, no text chunks)",
}
REPLACEMENT_CHARACTER = "\ufffd"


def output_token_count_line(
    total: int,
    source_counts: Mapping[str, int],
    *,
    tokenizer_total: int | None = None,
    mismatches: int | None = None,
    texts_with_replacement: int = 0,
) -> str:
    """One line saying which output token count every figure uses and, when the tokenizer re-counted the
    generated text, why its total differs (result.json's `total_output_tokens`, `output_tokens_source_counts`,
    `total_output_tokens_tokenizer`, `output_token_count_mismatches`)."""
    counted = sum(source_counts.values())
    if not counted:
        return "Output tokens: none (no successful request)."
    parts = [
        f"{_SOURCES.get(source, source)} for {_requests(n, counted)}"
        for source, n in sorted(source_counts.items(), key=lambda item: -item[1])
    ]
    line = f"Output tokens: {total}, counted {'; '.join(parts)}, used in every figure above"
    by_server = source_counts.get("usage", 0)
    if not by_server:
        return line + "."
    if tokenizer_total is None:
        return line + "; no tokenizer was loaded to cross-check it."
    if not mismatches:
        return line + f"; the tokenizer's re-count of the generated text agrees ({tokenizer_total})."
    if texts_with_replacement:
        why = (
            f": {texts_with_replacement} of {counted} texts hold U+FFFD (a character whose bytes were split "
            "or invalid), which re-encodes as 3 byte tokens"
        )
    else:
        why = " (neighbouring tokens can merge into one)"
    return (
        line + f"; the tokenizer's re-count of the generated text gives {tokenizer_total} ({mismatches} of "
        f"{by_server} requests differ) because decoded text need not re-encode to the same tokens{why}."
    )


def _requests(n: int, of: int) -> str:
    if n == of:
        return f"all {n} requests" if n > 1 else "the one request"
    return f"{n} request" + ("s" if n != 1 else "")


def _token_count_line(
    records: Sequence[RequestRecord], per_request: Sequence[RequestMetrics], *, tokenizer: bool
) -> str:
    ok = [(r, m) for r, m in zip(records, per_request, strict=True) if m.success]
    return output_token_count_line(
        sum(m.output_tokens or 0 for _, m in ok),
        Counter(m.output_tokens_source or "unknown" for _, m in ok),
        tokenizer_total=sum(m.tokenizer_output_tokens or 0 for _, m in ok) if tokenizer else None,
        mismatches=sum(m.output_tokens_source == "usage" and m.tokenizer_output_tokens != m.output_tokens
                       for _, m in ok),
        texts_with_replacement=sum(REPLACEMENT_CHARACTER in r.reasoning_text + r.output_text for r, _ in ok),
    )  # fmt: skip


def _seconds_line(label: str, values: Sequence[float]) -> str:
    if not values:
        return f"{label}: n/a."
    return f"{label}: {sum(values) / len(values):.3f} seconds."


def _latency_lines(what: str, seconds: Sequence[float]) -> list[str]:
    if not seconds:
        return [f"{name} {what}: n/a." for name in ("Average", "P90", "P95")]
    average = sum(seconds) / len(seconds)
    return [
        f"Average {what}: {average * 1000:.2f} milliseconds.",
        f"P90 {what}: {_percentile(seconds, 90) * 1000:.2f} milliseconds.",
        f"P95 {what}: {_percentile(seconds, 95) * 1000:.2f} milliseconds.",
    ]
