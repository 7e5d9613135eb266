"""Metric arithmetic on synthetic timelines with known answers.

Times are binary fractions (0.25, 0.5, ...) so that expected values are exact in floating point.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from llmstack.bench.metrics import request_metrics, summarize
from llmstack.bench.openai import apply_sse_events
from llmstack.bench.records import RequestRecord, load_records
from llmstack.phases.common import dump_records
from llmstack.results.text_report import format_load_level, format_seed_report, format_table


def streamed(
    index: int,
    sent: float,
    chunks: list[float],
    tokens: int | None,
    *,
    prompt: int | None = 10,
    counts: list[int] | None = None,
    scheduled: float | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        stream=True,
        scheduled_at=scheduled,
        sent_at=sent,
        first_content_at=chunks[0] if chunks else None,
        done_at=(chunks[-1] if chunks else sent) + 0.125,
        chunk_times=chunks,
        chunk_token_counts=counts,
        output_text="x" * len(chunks),
        prompt_tokens=prompt,
        completion_tokens=tokens,
        finish_reason="length",
        http_status=200,
        success=True,
    )


def failed(index: int, sent: float, error: str) -> RequestRecord:
    return RequestRecord(index=index, sent_at=sent, done_at=sent + 0.5, http_status=500, error=error)


def test_chunks_carrying_several_tokens() -> None:
    # 4 tokens in 3 chunks (1 + 2 + 1): TPOT is per token, ITL per chunk gap (as vLLM).
    record = streamed(0, 0.0, [1.0, 1.25, 1.75], 4, counts=[1, 2, 1])
    m = request_metrics(record)
    assert (m.ttft, m.e2el, m.tpot, m.itls) == (1.0, 1.75, 0.25, [0.25, 0.5])
    assert (m.output_tokens, m.output_tokens_source) == (4, "usage")

    summary = summarize([record], 0.0, 2.0)
    assert summary["mean_ttft_ms"] == 1000.0
    assert summary["mean_tpot_ms"] == 250.0
    assert summary["mean_itl_ms"] == 375.0
    assert summary["median_itl_ms"] == 375.0
    assert summary["std_itl_ms"] == 125.0
    assert summary["p50_itl_ms"] == 375.0
    assert summary["p90_itl_ms"] == 475.0
    assert summary["mean_e2el_ms"] == 1750.0
    assert summary["total_output_tokens"] == 4
    assert summary["output_throughput"] == 2.0
    # Peak output tokens/s counts the tokens of each chunk: 1 + 2 + 1 land in second [1, 2).
    assert summary["max_output_tokens_per_s"] == 4.0


def test_server_chunk_counts_used_when_usage_is_missing() -> None:
    record = streamed(0, 0.0, [1.0, 1.25, 1.75], None, counts=[1, 2, 1])
    m = request_metrics(record)
    assert (m.output_tokens, m.output_tokens_source, m.tpot) == (4, "chunk_usage", 0.25)


def test_failed_requests_are_excluded_from_throughput_and_counted() -> None:
    records = [
        streamed(0, 0.0, [0.5, 1.0], 2, prompt=8),
        failed(1, 0.25, "HTTP 500 Internal Server Error: boom"),
        streamed(2, 0.5, [1.0, 1.5, 2.0], 3, prompt=8),
        failed(3, 0.75, "HTTP 500 Internal Server Error: boom"),
        failed(4, 1.0, "server closed the connection mid-response"),
    ]
    summary = summarize(records, 0.0, 2.0)
    assert (summary["completed"], summary["failed"], summary["num_prompts"]) == (2, 3, 5)
    assert summary["request_throughput"] == 1.0
    assert summary["total_input_tokens"] == 16
    assert summary["total_output_tokens"] == 5
    assert summary["output_throughput"] == 2.5
    assert summary["total_token_throughput"] == 10.5
    assert summary["errors"] == ["", records[1].error, "", records[3].error, records[4].error]
    assert summary["error_counts"] == {
        "HTTP 500 Internal Server Error: boom": 2,
        "server closed the connection mid-response": 1,
    }
    assert summary["ttfts"] == [0.5, None, 0.5, None, None]
    assert summary["output_lens"] == [2, None, 3, None, None]
    assert summary["mean_ttft_ms"] == 500.0


@pytest.mark.parametrize("tokens", [1, 2])
def test_output_length_one_and_two(tokens: int) -> None:
    chunks = [0.5, 0.75][:tokens]
    records = [streamed(0, 0.0, chunks, tokens), streamed(1, 0.0, chunks, tokens)]
    summary = summarize(records, 0.0, 1.0, goodput_slos={"tpot": 100.0})
    assert summary["mean_ttft_ms"] == 500.0
    if tokens == 1:
        for key in (
            "mean_tpot_ms",
            "median_tpot_ms",
            "std_tpot_ms",
            "p99_tpot_ms",
            "mean_itl_ms",
            "p99_itl_ms",
        ):
            assert summary[key] is None
        # vLLM: one output token means tpot 0 for goodput.
        assert summary["request_goodput"] == 2.0
    else:
        assert summary["mean_tpot_ms"] == 250.0
        assert summary["p99_itl_ms"] == 250.0
        assert summary["request_goodput"] == 0.0
    report = format_seed_report(records, 0.0, 1.0, concurrency=2)
    if tokens == 1:
        assert "Average next token latency: n/a." in report
    else:
        assert "Average next token latency: 250.00 milliseconds." in report


def test_zero_successful_requests() -> None:
    records = [failed(0, 0.0, "connect to 127.0.0.1:1 failed: ConnectionRefusedError"), failed(1, 0.0, "x")]
    summary = summarize(records, 0.0, 1.0, goodput_slos={"ttft": 100.0})
    assert (summary["completed"], summary["failed"]) == (0, 2)
    assert summary["request_throughput"] == 0.0
    assert summary["output_throughput"] == 0.0
    assert summary["request_goodput"] == 0.0
    assert summary["mean_ttft_ms"] is None and summary["p99_e2el_ms"] is None
    assert summary["mean_output_len"] is None
    assert summary["max_output_tokens_per_s"] is None
    json.dumps(summary, allow_nan=False)  # no NaN sneaks into the JSON
    table = format_load_level(summary, "c=2")
    assert table.splitlines()[1].split()[:3] == ["c=2", "0", "2"]
    report = format_seed_report(records, 0.0, 1.0, concurrency=2)
    assert "Average first token latency: n/a." in report
    assert "Failed requests: 2 of 2" in report


def test_no_records_and_zero_window() -> None:
    summary = summarize([], 1.0, 1.0)
    assert summary["completed"] == 0
    assert summary["request_throughput"] is None
    assert summary["max_concurrent_requests"] == 0


def test_empty_choices_and_role_chunks_through_the_parser() -> None:
    events = [
        (0.25, {"choices": [{"delta": {"role": "assistant", "content": ""}}]}),
        (0.5, {"choices": [{"delta": {"content": "A"}}]}),
        (0.75, {"choices": [{"delta": {"content": "B"}}]}),
        (1.0, {"choices": [{"delta": {"content": "C"}}]}),
        (1.25, {"choices": [{"delta": {}, "finish_reason": "length"}]}),
        (1.5, {"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 3}}),
    ]
    record = RequestRecord(index=0, sent_at=0.0, stream=True, success=True)
    apply_sse_events(record, [t for t, _ in events], [json.dumps(e).encode() for _, e in events])
    m = request_metrics(record)
    # The role chunk is not a token; the finish and usage chunks do not end the request.
    assert (m.ttft, m.e2el, m.tpot, m.itls) == (0.5, 1.0, 0.25, [0.25, 0.25])
    assert (m.input_tokens, m.output_tokens) == (6, 3)


def test_goodput_against_each_slo() -> None:
    records = [
        streamed(0, 0.0, [0.25, 0.5, 0.75], 3),  # ttft 250, tpot 250, e2el 750
        streamed(1, 0.0, [0.5, 1.5, 2.5], 3),  # ttft 500, tpot 1000, e2el 2500
        streamed(2, 0.0, [1.0, 1.25, 1.5], 3),  # ttft 1000, tpot 250, e2el 1500
    ]
    goodput = {
        "ttft": 2.0 / 4.0,
        "tpot": 2.0 / 4.0,
        "e2el": 1.0 / 4.0,
    }
    limits = {"ttft": 500.0, "tpot": 250.0, "e2el": 1000.0}
    for name, expected in goodput.items():
        summary = summarize(records, 0.0, 4.0, goodput_slos={name: limits[name]})
        assert summary["request_goodput"] == expected, name
    summary = summarize(records, 0.0, 4.0, goodput_slos={"ttft": 500.0, "tpot": 250.0})
    assert summary["request_goodput"] == 0.25
    assert summary["goodput_slos_ms"] == {"ttft": 500.0, "tpot": 250.0}
    assert summarize(records, 0.0, 4.0)["request_goodput"] is None
    with pytest.raises(ValueError, match="unknown goodput"):
        summarize(records, 0.0, 4.0, goodput_slos={"itl": 5.0})


def test_tokenizer_fallback_and_mismatch_reporting() -> None:
    def words(text: str) -> int:
        return len(text.split())

    no_usage = streamed(0, 0.0, [0.5, 1.0, 1.5], None)
    no_usage.output_text = "one two three four five"
    with_usage = streamed(1, 0.0, [0.5, 1.0], 2)
    with_usage.output_text = "alpha beta gamma"
    agreeing = streamed(2, 0.0, [0.5, 1.0], 2)
    agreeing.output_text = "alpha beta"
    summary = summarize([no_usage, with_usage, agreeing], 0.0, 2.0, count_tokens=words)
    assert summary["output_lens"] == [5, 2, 2]
    assert summary["total_output_tokens"] == 9
    assert summary["total_output_tokens_tokenizer"] == 10
    assert summary["output_token_count_mismatches"] == 1
    assert summary["output_lens_tokenizer"] == [5, 3, 2]
    assert summary["output_tokens_source_counts"] == {"tokenizer": 1, "usage": 2}
    # Without a tokenizer and without usage the chunk count is the (lower-bound) fallback.
    assert summarize([no_usage], 0.0, 2.0)["output_lens"] == [3]


def test_non_streaming_requests_have_latency_only() -> None:
    record = RequestRecord(
        index=0, stream=False, sent_at=0.5, done_at=1.75, completion_tokens=4, prompt_tokens=2, success=True
    )
    summary = summarize([record], 0.0, 2.0)
    assert summary["mean_e2el_ms"] == 1250.0
    assert summary["mean_ttft_ms"] is None and summary["mean_tpot_ms"] is None
    assert summary["total_output_tokens"] == 4
    assert summary["max_output_tokens_per_s"] is None


def test_client_queue_time_and_percentiles() -> None:
    records = [
        streamed(i, sent, [sent + 0.5, sent + 1.0], 2, scheduled=sent - wait)
        for i, (sent, wait) in enumerate([(0.0, 0.0), (0.5, 0.25), (1.0, 0.5), (1.5, 0.75)])
    ]
    summary = summarize(records, 0.0, 3.0)
    assert summary["queue_times"] == [0.0, 0.25, 0.5, 0.75]
    assert summary["mean_client_queue_time_ms"] == 375.0
    assert summary["p50_client_queue_time_ms"] == 375.0
    assert summary["p90_client_queue_time_ms"] == 675.0
    assert summary["mean_e2el_including_client_queue_ms"] == 1375.0
    assert summary["start_times"] == [0.0, 0.5, 1.0, 1.5]
    # Requests overlap pairwise: [0, 1.125), [0.5, 1.625), [1, 2.125), [1.5, 2.625).
    assert summary["max_concurrent_requests"] == 3
    closed = summarize([streamed(0, 0.0, [0.5], 1)], 0.0, 1.0)
    assert closed["mean_client_queue_time_ms"] is None


def test_seed_report_uses_per_token_arithmetic() -> None:
    records = [
        streamed(0, 0.0, [0.25, 0.5, 1.25], 3),  # ttft 250 ms; next token (1.25 - 0.25) / 2 = 500 ms
        streamed(1, 0.0, [0.5, 0.75, 1.0], 5, counts=[1, 2, 2]),  # next token 0.5 / 4 = 125 ms
        failed(2, 0.0, "HTTP 503 Service Unavailable"),
    ]
    report = format_seed_report(records, 0.0, 2.0, concurrency=3)
    lines = report.splitlines()
    assert lines[0] == "Total time for 3 requests with 3 concurrent requests: 2.00 seconds."
    assert lines[1] == "Average response time: 1.250 seconds."  # done_at = last chunk + 0.125
    assert lines[2] == "Token throughput: 4.00 tokens/s."  # 8 tokens of successful requests / 2 s
    assert lines[3] == "Average first token latency: 375.00 milliseconds."
    assert lines[4] == "P90 first token latency: 475.00 milliseconds."
    assert lines[5] == "P95 first token latency: 487.50 milliseconds."
    assert lines[6] == "Average next token latency: 312.50 milliseconds."
    assert lines[7] == "P90 next token latency: 462.50 milliseconds."
    assert lines[9] == "Failed requests: 1 of 3 (first error: HTTP 503 Service Unavailable)."
    assert format_seed_report(records, 0.0, 2.0, concurrency=None, request_rate=4.0).startswith(
        "Total time for 3 requests at 4 requests/s: 2.00 seconds."
    )


def test_table_columns_and_values() -> None:
    summary = summarize([streamed(0, 0.0, [0.25, 0.5, 0.75], 3)], 0.0, 1.0)
    summary2 = summarize([streamed(0, 0.0, [0.5, 1.0], 2), failed(1, 0.0, "x")], 0.0, 2.0)
    lines = format_table([summary, summary2], ["c=1", "c=2"]).splitlines()
    header = lines[0].split()
    assert header[:4] == ["load", "ok", "fail", "dur_s"]
    row = dict(zip(header, lines[1].split(), strict=True))
    assert row == {
        "load": "c=1",
        "ok": "1",
        "fail": "0",
        "dur_s": "1.00",
        "req/s": "1.00",
        "out_tok/s": "3.0",
        "tot_tok/s": "13.0",
        "ttft_mean": "250.0",
        "ttft_p50": "250.0",
        "ttft_p99": "250.0",
        "tpot_mean": "250.00",
        "tpot_p99": "250.00",
        "itl_p99": "250.00",
        "e2el_mean": "750.0",
    }
    row2 = dict(zip(header, lines[2].split(), strict=True))
    assert (row2["ok"], row2["fail"], row2["req/s"]) == ("1", "1", "0.50")
    assert len({len(line) for line in lines[:3]}) == 1  # fixed width


def test_records_round_trip_through_jsonl(tmp_path: object) -> None:
    records = [streamed(0, 0.0, [0.25, 0.5], 2, counts=[1, 1], scheduled=-0.25), failed(1, 0.5, "boom")]
    records[0].reasoning_text = "hmm"
    path = tmp_path / "requests.jsonl"  # type: ignore[operator]
    dump_records(path, records)
    assert load_records(path) == records
    assert len(path.read_text().splitlines()) == 2


def test_summary_is_strict_json_and_has_vllm_keys() -> None:
    summary = summarize([streamed(0, 0.0, [0.25, 0.5], 2)], 0.0, 1.0)
    for key in (
        "duration",
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "input_lens",
        "output_lens",
        "ttfts",
        "itls",
        "latencies",
        "start_times",
        "queue_times",
        "generated_texts",
        "errors",
        "max_output_tokens_per_s",
        "max_concurrent_requests",
        "mean_ttft_ms",
        "median_ttft_ms",
        "std_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "p99_tpot_ms",
        "mean_itl_ms",
        "p99_itl_ms",
        "mean_e2el_ms",
        "p99_e2el_ms",
    ):
        assert key in summary, key
    assert not any(isinstance(v, float) and math.isnan(v) for v in summary.values())
    assert summarize([streamed(0, 0.0, [0.5], 1)], 0.0, 1.0, percentiles=[99.9])["p99.9_ttft_ms"] == 500.0


def test_metrics_and_loadgen_do_not_import_numpy_at_import_time() -> None:
    code = (
        "import sys, llmstack.bench.loadgen, llmstack.bench.metrics, llmstack.results.text_report;"
        "sys.exit('numpy' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
