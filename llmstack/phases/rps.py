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
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmstack.config.schema import RunConfig
from llmstack.errors import BenchmarkError, ConfigError
from llmstack.phases.common import (
    ENDPOINTS,
    Level,
    PhaseContext,
    check_engine,
    level_rundir,
    load_tokenizer,
    request_payload,
)
from llmstack.phases.http_options import (
    HttpBenchmarkConfig,
    at_least,
    fits_context,
    http_problems,
    positive_seconds,
    served_context,
)
from llmstack.phases.runner import HttpPhase

if TYPE_CHECKING:
    from llmstack.bench.loadgen import LoadResult
    from llmstack.results.rundir import RunDir

logger = logging.getLogger(__name__)

WRK_CHOICES = ("auto", "never", "always")
# 600 s of histogram is 4.8 GB of address space already (wrk 4.1: `stats_alloc(timeout_ms * 1000)` uint64s).
WRK_MAX_TIMEOUT_S = 600.0


@dataclass
class RpsBenchmarkConfig(HttpBenchmarkConfig):
    phase: str = "rps"
    # The fixed prompt: our fixed text cut to this many tokens (the seed's payload is about 1024).
    input_len: int = 1024
    output_len: int = 128
    temperature: float = 0.5
    # Closed-loop connections, each sending the next request when the previous one ends, for duration_s.
    connections: int = 12
    duration_s: float = 60.0
    # auto: also run wrk with the same payload when it is on PATH; never; always (an error without wrk).
    wrk: str = "auto"
    # wrk -t; None: min(connections, CPUs).
    wrk_threads: int | None = None
    # wrk --timeout. wrk sizes its latency histogram by it (8 bytes per microsecond: 60 s = 480 MB of
    # address space), so it has its own, smaller limit than timeout_s.
    wrk_timeout_s: float = 60.0
    timeout_s: float = 3600.0
    percentiles: list[float] = field(default_factory=lambda: [50.0, 75.0, 90.0, 99.0])


CONFIG = RpsBenchmarkConfig


def problems(run: RunConfig, b: RpsBenchmarkConfig) -> Iterator[ConfigError]:
    # Non-streaming requests: no first token to time.
    yield from http_problems(b, streamed=False)
    yield from at_least("benchmark.connections", b.connections, 1)
    yield from positive_seconds("benchmark.duration_s", b.duration_s)
    yield from at_least("benchmark.input_len", b.input_len, 1)
    yield from fits_context(b.input_len, b.output_len, served_context(run))
    if b.wrk not in WRK_CHOICES:
        yield ConfigError("benchmark.wrk", b.wrk, "is not a wrk mode.", WRK_CHOICES)
    if not 0 < b.wrk_timeout_s <= WRK_MAX_TIMEOUT_S:
        yield ConfigError(
            "benchmark.wrk_timeout_s",
            b.wrk_timeout_s,
            f"must be in (0, {WRK_MAX_TIMEOUT_S:g}] seconds: wrk reserves 8 bytes of memory per microsecond "
            "of its timeout for its latency histogram.",
        )
    if b.wrk_threads is not None and not 1 <= b.wrk_threads <= max(b.connections, 1):
        yield ConfigError(
            "benchmark.wrk_threads",
            b.wrk_threads,
            f"must be between 1 and benchmark.connections ({b.connections}): wrk gives every thread at "
            "least one connection.",
        )


def host_problems(run: RunConfig, b: RpsBenchmarkConfig) -> Iterator[ConfigError]:
    if b.wrk == "always" and shutil.which("wrk") is None:
        yield ConfigError(
            "benchmark.wrk",
            b.wrk,
            "needs the wrk program, which is not on PATH.",
            WRK_CHOICES,
            hint="Install it (Debian/Ubuntu: apt-get install -y wrk) or use benchmark.wrk=auto.",
        )


def prepare(ctx: PhaseContext) -> RpsPhase:
    return RpsPhase(ctx)


class RpsPhase(HttpPhase):
    # bench-<label>/, made when the phase runs.
    level_dir: RunDir

    def __init__(self, ctx: PhaseContext) -> None:
        from llmstack.bench.fixed_text import fixed_text
        from llmstack.bench.prompts import token_counter, truncated_prompt

        bench = ctx.run.benchmark
        assert isinstance(bench, RpsBenchmarkConfig)
        super().__init__(ctx, bench)
        self.bench: RpsBenchmarkConfig = bench
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
        self.levels = [self.level]
        self.warmup_payloads = [self.payload] * bench.warmup_requests
        self.extra: dict[str, Any] = {}
        self.wrk_result: Any = None
        ctx.summary.update({"endpoint": "completions", "levels": []})

    def before(self, server: Any) -> None:
        from llmstack.bench import wrk

        # Made now, not when prepared: a run whose engine never starts leaves no level directory.
        self.level_dir = level_rundir(self.ctx, self.level.label)
        self.level_dir.write_text("payload.lua", wrk.payload_lua(self.payload))

    def measure(self, level: Level, server: Any) -> LoadResult:
        bench = self.bench
        logger.info(
            "rps: %d connections for %g s, %d prompt tokens, %d output tokens",
            bench.connections,
            bench.duration_s,
            self.prompt.tokens,
            bench.output_len,
        )
        return self.load(
            level, server, [self.payload], duration_s=bench.duration_s, input_lens=[self.prompt.tokens]
        )

    def level_extra(self, level: Level, result: LoadResult, server: Any) -> dict[str, Any]:
        from llmstack.bench.loadgen import completed_by

        bench = self.bench
        in_time = completed_by(result, result.start + bench.duration_s)
        latencies = [r.done_at - r.sent_at for r in result.records if r.success and r.done_at and r.sent_at]
        self.wrk_result, self.wrk_error = self._run_wrk(server)
        self.extra = {
            "rps": {
                "connections": bench.connections,
                "duration_s": bench.duration_s,
                "prompt_tokens": self.prompt.tokens,
                "completed_within_duration": in_time,
                "requests_per_s_wrk_style": in_time / bench.duration_s,
                "max_e2el_ms": max(latencies) * 1000.0 if latencies else None,
            },
            "wrk": self.wrk_result.to_dict() if self.wrk_result is not None else None,
            "wrk_error": self.wrk_error,
        }
        return self.extra

    def after_level(self, level: Level, summary: dict[str, Any]) -> None:
        ctx, rps = self.ctx, self.extra["rps"]
        table = side_by_side(summary, rps, self.wrk_result, self.bench.percentiles)
        self.level_dir.write_text("rps.txt", table + "\n")
        print(table, flush=True)
        if self.wrk_error:
            logger.warning("%s", self.wrk_error)
        ctx.summary["levels"][-1]["requests_per_s_wrk_style"] = rps["requests_per_s_wrk_style"]
        ctx.summary["wrk"] = self.extra["wrk"]
        ctx.save()

    def _run_wrk(self, server: Any) -> tuple[Any, str | None]:
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
        where = self.level_dir.path
        # wrk stops at the deadline; a minute more covers its start and its summary.
        output, report, error = wrk.run_wrk(
            command,
            cwd=where,
            api_key=self.ctx.api_key,
            timeout_s=bench.duration_s + bench.wrk_timeout_s + 60,
            should_stop=self.ctx.should_stop(server),
        )
        self.level_dir.write_text("wrk.txt", " ".join(command) + "\n\n" + output)
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
