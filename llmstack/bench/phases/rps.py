"""The rps phase (replaces `wrk -t12 -c12 -d15m -s payload-1024.lua`): requests/s of one fixed payload.

One non-streaming completion (our fixed text cut to exactly `input_len` tokens, `output_len` tokens out) is
sent by `connections` closed-loop connections for `duration_s`. The run directory gets the equivalent
`payload.lua`; with `wrk` on PATH (and benchmark.wrk not `never`) wrk then sends the very same bytes for
the same time, and both are reported side by side.

Two request rates are given for our client: vLLM's (`request_throughput`: successes over the window from
the first send until the last response, in-flight requests at the deadline included) and wrk's
(`requests_per_s_wrk_style`: successes finished within the duration, over the duration).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from llmstack.bench.phases.common import (
    ENDPOINTS,
    Level,
    PhaseContext,
    check_engine,
    end_progress_line,
    finish_level,
    goodput_slos,
    level_rundir,
    load_tokenizer,
    log_failures,
    request_payload,
    timed_progress_bar,
    warm_up,
)
from llmstack.config.schema import RpsBenchmarkConfig
from llmstack.errors import BenchmarkError

logger = logging.getLogger(__name__)


def prepare(ctx: PhaseContext) -> RpsPhase:
    return RpsPhase(ctx)


class RpsPhase:
    def __init__(self, ctx: PhaseContext) -> None:
        from llmstack.bench.fixed_text import fixed_text
        from llmstack.bench.prompts import token_counter, truncated_prompt

        bench = ctx.run.benchmark
        assert isinstance(bench, RpsBenchmarkConfig)
        self.ctx = ctx
        self.bench = bench
        tokenizer = load_tokenizer(ctx)
        self.count_tokens = token_counter(tokenizer)
        self.prompt = truncated_prompt(tokenizer, fixed_text(bench.input_len), bench.input_len)
        self.payload = request_payload(
            model=ctx.served_name,
            endpoint="completions",
            content=self.prompt.text,
            output_len=bench.output_len,
            stream=False,
            ignore_eos=bench.ignore_eos,
            min_tokens=bench.min_tokens,
            temperature=bench.temperature,
        )
        self.level = Level(f"c{bench.connections}", bench.connections)
        ctx.summary.update({"endpoint": "completions", "levels": []})

    def run(self, server: Any) -> None:
        from llmstack.bench import wrk
        from llmstack.bench.loadgen import completed_by, run_load_sync

        bench, ctx = self.bench, self.ctx
        endpoint = ENDPOINTS["completions"]
        level_dir = level_rundir(ctx, self.level.label)
        level_dir.write_text("payload.lua", wrk.payload_lua(self.payload))
        warm_up(
            ctx,
            server,
            [self.payload] * bench.warmup_requests,
            endpoint=endpoint,
            concurrency=max(1, min(bench.warmup_requests, bench.connections)),
            timeout_s=bench.timeout_s,
        )
        logger.info(
            "rps: %d connections for %g s, %d prompt tokens, %d output tokens",
            bench.connections,
            bench.duration_s,
            self.prompt.tokens,
            bench.output_len,
        )
        check_engine(server, f"before load level {self.level.label}")
        result = run_load_sync(
            ctx.base_url,
            [self.payload],
            endpoint=endpoint,
            concurrency=bench.connections,
            duration_s=bench.duration_s,
            api_key=ctx.api_key,
            timeout_s=bench.timeout_s,
            input_lens=[self.prompt.tokens],
            progress=timed_progress_bar(self.level.label, bench.duration_s),
            should_stop=ctx.should_stop(server),
        )
        end_progress_line()
        in_time = completed_by(result, result.start + bench.duration_s)
        latencies = [r.done_at - r.sent_at for r in result.records if r.success and r.done_at and r.sent_at]
        ours_wrk_style = in_time / bench.duration_s
        wrk_result, wrk_error = self._run_wrk(server, level_dir.path)
        extra: dict[str, Any] = {
            "rps": {
                "connections": bench.connections,
                "duration_s": bench.duration_s,
                "prompt_tokens": self.prompt.tokens,
                "completed_within_duration": in_time,
                "requests_per_s_wrk_style": ours_wrk_style,
                "max_e2el_ms": max(latencies) * 1000.0 if latencies else None,
            },
            "wrk": wrk_result.to_dict() if wrk_result is not None else None,
            "wrk_error": wrk_error,
        }
        summary = finish_level(
            ctx,
            server,
            self.level,
            result,
            count_tokens=self.count_tokens,
            percentiles=bench.percentiles,
            slos=goodput_slos(bench),
            extra=extra,
        )
        table = side_by_side(summary, extra["rps"], wrk_result, bench.percentiles)
        level_dir.write_text("rps.txt", table + "\n")
        print(table, flush=True)
        if wrk_error:
            logger.warning("%s", wrk_error)
        ctx.summary["levels"][-1]["requests_per_s_wrk_style"] = ours_wrk_style
        ctx.summary["wrk"] = wrk_result.to_dict() if wrk_result is not None else None
        ctx.save()
        log_failures(ctx)

    def _run_wrk(self, server: Any, where: Any) -> tuple[Any, str | None]:
        from llmstack.bench import wrk

        bench = self.bench
        if bench.wrk == "never":
            return None, None
        if not wrk.available():
            if bench.wrk == "always":
                raise BenchmarkError("benchmark.wrk=always, but wrk is not on PATH")
            logger.info("wrk is not installed: only llmstack's client was measured")
            return None, None
        check_engine(server, "before wrk")
        threads = bench.wrk_threads or max(1, min(bench.connections, os.cpu_count() or 1))
        command = wrk.wrk_command(
            self.ctx.base_url + ENDPOINTS["completions"],
            "payload.lua",
            threads=threads,
            connections=bench.connections,
            duration_s=bench.duration_s,
            timeout_s=bench.wrk_timeout_s,
        )
        # wrk stops at the deadline; a minute more covers its start and its summary.
        output, report, error = wrk.run_wrk(
            command,
            cwd=where,
            api_key=self.ctx.api_key,
            timeout_s=bench.duration_s + bench.wrk_timeout_s + 60,
            should_stop=self.ctx.should_stop(server),
        )
        (where / "wrk.txt").write_text(" ".join(command) + "\n\n" + output)
        return report, error


def side_by_side(
    summary: dict[str, Any], rps: dict[str, Any], wrk_report: Any, percentiles: list[float]
) -> str:
    """Our client's figures next to wrk's, latencies in ms."""
    w = wrk_report
    ours_wrk_style = rps["requests_per_s_wrk_style"]
    rows: list[tuple[str, Any, Any]] = [
        ("completed requests", summary.get("completed"), w.requests if w else None),
        ("failed requests", summary.get("failed"), w.errors if w else None),
        ("requests/s (done in duration / duration)", ours_wrk_style, w.requests_per_s if w else None),
        ("requests/s (vLLM: successes / window)", summary.get("request_throughput"), None),
        ("latency mean (ms)", summary.get("mean_e2el_ms"), _ms(w.latency_mean_s if w else None)),
        ("latency stdev (ms)", summary.get("std_e2el_ms"), _ms(w.latency_stdev_s if w else None)),
    ]
    wrk_percentiles = (w.latency_percentiles_s or {}) if w else {}
    for p in percentiles:
        key = f"p{int(p)}" if float(p).is_integer() else f"p{p}"
        ours = summary.get(f"{key}_e2el_ms")
        rows.append((f"latency {key} (ms)", ours, _ms(wrk_percentiles.get(float(p)))))
    rows.append(("latency max (ms)", rps.get("max_e2el_ms"), _ms(w.latency_max_s if w else None)))
    rows.append(("output tokens/s", summary.get("output_throughput"), None))
    header = ("", "llmstack", "wrk" if wrk_report is not None else "wrk (not run)")
    cells = [header] + [(name, _cell(a), _cell(b)) for name, a, b in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    lines = [
        f"{row[0].ljust(widths[0])}  {row[1].rjust(widths[1])}  {row[2].rjust(widths[2])}" for row in cells
    ]
    return "\n".join(lines)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}"
