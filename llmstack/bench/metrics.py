"""Benchmark metrics from request records: pure functions; keys as in `vllm bench serve --save-result`.

Definitions (per successful request; times from `RequestRecord`, which see):

- `ttft` = first chunk carrying generated text - `sent_at`. Unlike current vLLM, which starts the clock at
  the first chunk with a non-empty `choices` list, a role-only or empty-text chunk does not count.
- `e2el` = last chunk carrying generated text - `sent_at` (the usage chunk and `[DONE]` are not tokens).
  Non-streaming requests: `done_at - sent_at`; they have no ttft, tpot or itl.
- `tpot` = (e2el - ttft) / (output_tokens - 1), only when output_tokens > 1; averaged per request (each
  request weighs one).
- `itl` = every gap between consecutive text chunks, pooled over all requests (long outputs weigh more).
  When a chunk carries k > 1 tokens (speculative decoding, server-side batching of the stream, a proxy
  merging events), its gap is one ITL sample and is NOT divided by k: this is what vLLM does, and it makes
  ITL an inter-chunk latency. The per-token figure is `tpot`, which uses token counts. Because chunks
  without text are not chunks here, a server that streams some tokens as empty text (byte-fallback pieces
  of a multi-byte character, special tokens) shows a mean ITL above its TPOT, where vLLM's would not.
- Output tokens: `usage.completion_tokens` from the server; else the sum of per-chunk token counts the
  server reported; else `count_tokens(text)` when a tokenizer callback is given; else the number of text
  chunks (a lower bound). With a callback, the tokenizer count is computed too and the summary reports its
  total and how many requests disagree with the server.
- Input tokens: `usage.prompt_tokens`, else the record's `expected_input_tokens`, else unknown (counted as 0
  in totals; `input_tokens_unknown` says how many).
- Throughputs count successful requests only and divide by the measured window `end - start`.
- Goodput (DistServe, as vLLM): a successful request is good when every given SLO holds (`ttft`, `tpot`,
  `e2el`, in ms). As in vLLM a request with one output token has tpot 0 for this test; a request that lacks a
  metric (non-streaming and a ttft SLO) is not good.
- Client queue time = `sent_at - scheduled_at` (open loop only); `e2el_including_client_queue` adds it.

Undefined values are None, never NaN and never a made-up 0: statistics of an empty sample (no successful
request, no request with two tokens, closed loop for queue time), throughputs over a zero-length window, and
per-request entries of failed requests in the detailed lists. Statistics use numpy: `std` is the population
standard deviation and percentiles interpolate linearly, as vLLM's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from llmstack.bench.records import RequestRecord

if TYPE_CHECKING:
    from llmstack.bench.loadgen import LoadResult

__all__ = [
    "DEFAULT_PERCENTILES",
    "GOODPUT_METRICS",
    "LATENCY_METRICS",
    "RequestMetrics",
    "TokenCounter",
    "percentile_key",
    "request_metrics",
    "summarize",
    "summarize_load",
]

DEFAULT_PERCENTILES: tuple[float, ...] = (50, 90, 95, 99)
LATENCY_METRICS: tuple[str, ...] = (
    "ttft",
    "tpot",
    "itl",
    "e2el",
    "client_queue_time",
    "e2el_including_client_queue",
)
GOODPUT_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2el")

TokenCounter = Callable[[str], int]


@dataclass(slots=True)
class RequestMetrics:
    """Derived per-request values, in seconds and tokens. None where undefined."""

    index: int
    success: bool
    input_tokens: int | None = None
    output_tokens: int | None = None
    output_tokens_source: str | None = None  # usage | chunk_usage | tokenizer | chunk_count
    tokenizer_output_tokens: int | None = None
    ttft: float | None = None
    tpot: float | None = None
    e2el: float | None = None
    itls: list[float] = field(default_factory=list)
    client_queue_time: float | None = None

    @property
    def e2el_including_client_queue(self) -> float | None:
        if self.e2el is None or self.client_queue_time is None:
            return None
        return self.e2el + self.client_queue_time


def request_metrics(record: RequestRecord, count_tokens: TokenCounter | None = None) -> RequestMetrics:
    """Metrics of one request; a failed request only gets its input length and queue time."""
    metrics = RequestMetrics(index=record.index, success=record.success)
    metrics.input_tokens = (
        record.prompt_tokens if record.prompt_tokens is not None else record.expected_input_tokens
    )
    metrics.client_queue_time = record.client_queue_time
    if not record.success or record.sent_at is None:
        return metrics
    _fill_output_tokens(metrics, record, count_tokens)
    sent = record.sent_at
    chunks = record.chunk_times
    if record.stream and chunks:
        metrics.ttft = chunks[0] - sent
        metrics.e2el = chunks[-1] - sent
        metrics.itls = [b - a for a, b in pairwise(chunks)]
        if metrics.output_tokens is not None and metrics.output_tokens > 1:
            metrics.tpot = (metrics.e2el - metrics.ttft) / (metrics.output_tokens - 1)
    elif not record.stream and record.done_at is not None:
        metrics.e2el = record.done_at - sent
    return metrics


def _fill_output_tokens(
    metrics: RequestMetrics, record: RequestRecord, count_tokens: TokenCounter | None
) -> None:
    generated = record.reasoning_text + record.output_text
    if count_tokens is not None:
        metrics.tokenizer_output_tokens = count_tokens(generated) if generated else 0
    if record.completion_tokens is not None:
        metrics.output_tokens, metrics.output_tokens_source = record.completion_tokens, "usage"
    elif record.chunk_token_counts is not None:
        metrics.output_tokens, metrics.output_tokens_source = sum(record.chunk_token_counts), "chunk_usage"
    elif metrics.tokenizer_output_tokens is not None:
        metrics.output_tokens, metrics.output_tokens_source = metrics.tokenizer_output_tokens, "tokenizer"
    elif record.chunk_times:
        metrics.output_tokens, metrics.output_tokens_source = len(record.chunk_times), "chunk_count"


def summarize(
    records: Sequence[RequestRecord],
    start: float,
    end: float,
    *,
    count_tokens: TokenCounter | None = None,
    goodput_slos: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    detailed: bool = True,
) -> dict[str, Any]:
    """Summary of one load level over the window [start, end] (perf_counter seconds).

    `goodput_slos` maps any of ttft/tpot/e2el to a limit in ms. `detailed` adds the per-request lists
    (input_lens, output_lens, ttfts, itls, latencies, start_times, queue_times, generated_texts), in seconds
    and in record order; `errors` and `error_counts` are always there.
    """
    slos = _check_slos(goodput_slos)
    per_request = [request_metrics(r, count_tokens) for r in records]
    ok = [m for m in per_request if m.success]
    duration = end - start

    total_input = sum(m.input_tokens or 0 for m in ok)
    total_output = sum(m.output_tokens or 0 for m in ok)
    summary: dict[str, Any] = {
        "duration": duration,
        "num_prompts": len(records),
        "completed": len(ok),
        "failed": len(per_request) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": _rate(len(ok), duration),
        "request_goodput": _rate(_count_good(ok, slos), duration) if slos else None,
        "output_throughput": _rate(total_output, duration),
        "total_token_throughput": _rate(total_input + total_output, duration),
        "mean_input_len": _mean([m.input_tokens for m in ok if m.input_tokens is not None]),
        "mean_output_len": _mean([m.output_tokens for m in ok if m.output_tokens is not None]),
        "input_tokens_unknown": sum(m.input_tokens is None for m in ok),
        "output_tokens_source_counts": dict(Counter(m.output_tokens_source or "unknown" for m in ok)),
        "max_output_tokens_per_s": _peak_output_tokens_per_s([r for r in records if r.success]),
        "max_concurrent_requests": _peak_concurrency(records),
    }
    if slos:
        summary["goodput_slos_ms"] = dict(slos)
    if count_tokens is not None:
        summary["total_output_tokens_tokenizer"] = sum(m.tokenizer_output_tokens or 0 for m in ok)
        summary["output_token_count_mismatches"] = sum(
            m.output_tokens_source == "usage" and m.tokenizer_output_tokens != m.output_tokens for m in ok
        )
    for name, values in _latency_samples(ok).items():
        summary.update(_stats(name, values, percentiles))
    # vLLM's `errors` has one entry per request, "" for a success.
    errors = ["" if r.success else (r.error or "unknown error") for r in records]
    summary["errors"] = errors
    summary["error_counts"] = dict(Counter(e for e in errors if e).most_common())
    if detailed:
        summary.update(_details(records, per_request, start))
        if count_tokens is not None:
            summary["output_lens_tokenizer"] = [m.tokenizer_output_tokens for m in per_request]
    return summary


def summarize_load(result: LoadResult, **kwargs: Any) -> dict[str, Any]:
    """`summarize` of a `LoadResult`, plus its setup keys as vLLM names them."""
    summary: dict[str, Any] = {
        "request_rate": "inf" if math.isinf(result.request_rate) else result.request_rate,
        "burstiness": result.burstiness,
        "max_concurrency": result.concurrency,
    }
    summary.update(summarize(result.records, result.start, result.end, **kwargs))
    return summary


def _check_slos(goodput_slos: Mapping[str, float] | None) -> dict[str, float]:
    if not goodput_slos:
        return {}
    unknown = sorted(set(goodput_slos) - set(GOODPUT_METRICS))
    if unknown:
        raise ValueError(f"unknown goodput SLO(s) {unknown}; valid: {', '.join(GOODPUT_METRICS)}")
    for name, limit in goodput_slos.items():
        if not limit > 0:
            raise ValueError(f"goodput SLO {name} must be a positive number of ms, got {limit}")
    return {name: float(limit) for name, limit in goodput_slos.items()}


def _count_good(ok: Sequence[RequestMetrics], slos: Mapping[str, float]) -> int:
    good = 0
    for m in ok:
        observed = {
            "ttft": m.ttft,
            # vLLM: one output token means tpot 0 for goodput. Non-streaming has no tpot at all.
            "tpot": m.tpot if m.tpot is not None else (0.0 if m.ttft is not None else None),
            "e2el": m.e2el,
        }
        if all(observed[name] is not None and observed[name] * 1000 <= limit for name, limit in slos.items()):
            good += 1
    return good


def _rate(amount: float, duration: float) -> float | None:
    return amount / duration if duration > 0 else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _latency_samples(ok: Sequence[RequestMetrics]) -> dict[str, list[float]]:
    return {
        "ttft": [m.ttft for m in ok if m.ttft is not None],
        "tpot": [m.tpot for m in ok if m.tpot is not None],
        "itl": [gap for m in ok for gap in m.itls],
        "e2el": [m.e2el for m in ok if m.e2el is not None],
        "client_queue_time": [m.client_queue_time for m in ok if m.client_queue_time is not None],
        "e2el_including_client_queue": [v for m in ok if (v := m.e2el_including_client_queue) is not None],
    }


def percentile_key(p: float) -> str:
    """vLLM's spelling: 99 -> 'p99', 99.9 -> 'p99.9'."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def _stats(name: str, seconds: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"]
    keys += [f"{percentile_key(p)}_{name}_ms" for p in percentiles]
    if not seconds:
        return dict.fromkeys(keys, None)
    import numpy as np

    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    values = [np.mean(ms), np.median(ms), np.std(ms)]
    values += [np.percentile(ms, p) for p in percentiles]
    return {key: float(v) for key, v in zip(keys, values, strict=True)}


def _peak_output_tokens_per_s(ok_records: Sequence[RequestRecord]) -> float | None:
    """Most output tokens whose chunk arrived within one 1-second bucket from the first send (as vLLM).

    vLLM counts one token per chunk; here a chunk counts its reported tokens when known, else one.
    None when there are no streamed chunks (non-streaming runs, no success).
    """
    streamed = [r for r in ok_records if r.chunk_times and r.sent_at is not None]
    if not streamed:
        return None
    origin = min(r.sent_at for r in streamed if r.sent_at is not None)
    buckets: Counter[int] = Counter()
    for r in streamed:
        weights = r.chunk_token_counts if r.chunk_token_counts is not None else [1] * len(r.chunk_times)
        for t, n in zip(r.chunk_times, weights, strict=False):
            buckets[int(t - origin)] += n
    return float(max(buckets.values()))


def _peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Exact peak of requests in flight ([sent_at, done_at), all requests that were sent)."""
    events: list[tuple[float, int]] = []
    for r in records:
        if r.sent_at is not None and r.done_at is not None:
            events.append((r.sent_at, 1))
            events.append((r.done_at, -1))
    # At equal times the end sorts first: a request ending as another starts does not overlap it.
    events.sort(key=lambda e: (e[0], e[1]))
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def _details(
    records: Sequence[RequestRecord], per_request: Sequence[RequestMetrics], start: float
) -> dict[str, Any]:
    return {
        "input_lens": [m.input_tokens for m in per_request],
        "output_lens": [m.output_tokens for m in per_request],
        "ttfts": [m.ttft for m in per_request],
        "itls": [m.itls for m in per_request],
        "latencies": [m.e2el for m in per_request],
        # Relative to the window start (vLLM writes raw perf_counter values, meaningless across runs).
        "start_times": [r.sent_at - start if r.sent_at is not None else None for r in records],
        "queue_times": [m.client_queue_time for m in per_request],
        "generated_texts": [r.output_text for r in records],
    }
