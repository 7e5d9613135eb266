"""The one runner of the phases that load the live server (online, multimodal, rps): warm-up, then each load
level in turn (engine check, measure, write the level's files), then the table of all levels.

Every level writes `bench-<label>/result.json` (vLLM `bench serve --save-result` keys plus our provenance),
`requests.jsonl` (every request's timestamps and counts) and `report.txt` (the seed's report), prints its
table row and report, and adds its headline numbers to summary.json, which is saved at once.

A level ends early on a stop signal or when the engine dies. It is then written all the same, marked
`"complete": false` with the reason in `cut_short`, without throughputs (its window is not a whole level's),
and the run stops: Interrupted (exit 128 + signal) or EngineError (exit 3). After every level the engine's
health is checked, so that a model process that died under a living API server fails the run too.

A phase subclasses `HttpPhase`: it builds its payloads and levels when prepared, and says how one level is
measured (`measure`); `before`, `level_extra` and `after_level` are its hooks around the shared loop.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llmstack import interrupts
from llmstack.errors import BenchmarkError, EngineError
from llmstack.phases.common import (
    ENDPOINTS,
    Level,
    PhaseContext,
    check_engine,
    dump_records,
    level_rundir,
    provenance,
)
from llmstack.phases.http_options import HttpBenchmarkConfig

if TYPE_CHECKING:
    from llmstack.bench.loadgen import LoadResult
    from llmstack.bench.metrics import TokenCounter

logger = logging.getLogger(__name__)

# Keys of each level's summary that summary.json repeats (the full set is in result.json).
HEADLINE_KEYS = (
    "completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "mean_e2el_ms", "p99_e2el_ms", "mean_client_queue_time_ms", "complete", "cut_short",
    "not_sent",
)  # fmt: skip
# What a level cut short does not report: rates over a window that is not a whole level's.
RATE_KEYS = (
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "max_output_tokens_per_s",
)  # fmt: skip


class HttpPhase:
    """A phase that loads the live server with levels of requests; `run` is the same for all of them."""

    # completions | chat
    endpoint_name = "completions"

    def __init__(self, ctx: PhaseContext, bench: HttpBenchmarkConfig) -> None:
        self.ctx = ctx
        self.bench = bench
        self.levels: list[Level] = []
        self.warmup_payloads: list[dict[str, Any]] = []
        self.count_tokens: TokenCounter | None = None

    @property
    def endpoint(self) -> str:
        return ENDPOINTS[self.endpoint_name]

    def run(self, server: Any) -> None:
        ctx, bench = self.ctx, self.bench
        self.before(server)
        widest = max((lvl.concurrency or len(self.warmup_payloads)) for lvl in self.levels)
        warm_up(
            ctx,
            server,
            self.warmup_payloads,
            endpoint=self.endpoint,
            concurrency=max(1, min(len(self.warmup_payloads), widest)),
            timeout_s=bench.timeout_s,
        )
        summaries = []
        for level in self.levels:
            check_engine(server, f"before load level {level.label}")
            result = self.measure(level, server)
            summary = finish_level(
                ctx,
                server,
                level,
                result,
                count_tokens=self.count_tokens,
                percentiles=bench.percentiles,
                slos=goodput_slos(bench),
                extra=self.level_extra(level, result, server),
                chat=self.endpoint_name == "chat",
            )
            self.after_level(level, summary)
            summaries.append(summary)
        print_combined_table(ctx, summaries, [lvl.label for lvl in self.levels])
        log_failures(ctx)

    def measure(self, level: Level, server: Any) -> LoadResult:
        raise NotImplementedError

    def before(self, server: Any) -> None:
        """Before the warm-up."""

    def level_extra(self, level: Level, result: LoadResult, server: Any) -> dict[str, Any] | None:
        """More of the level's result.json (under `llmstack`), after it was measured."""
        return None

    def after_level(self, level: Level, summary: dict[str, Any]) -> None:
        """After the level's files were written and its headline saved."""

    def load(
        self,
        level: Level,
        server: Any,
        payloads: Sequence[dict[str, Any]],
        *,
        duration_s: float | None = None,
        quiet: bool = False,
        **options: Any,
    ) -> LoadResult:
        """One level's load through the client, with the status line of `llmstack.progress` (unless
        `quiet`): requests done of all, the current rate, the latest TTFT; erased before the level's
        results print."""
        from llmstack.bench.loadgen import run_load_sync
        from llmstack.progress import StatusLine

        timed = f" ({duration_s:.0f} s)" if duration_s is not None else ""
        status = StatusLine(f"load level {level.label}{timed}")

        def show(done: int, total: int, ttft_s: float | None) -> None:
            status.update(done=done, total=total or None, ttft_s=ttft_s)

        with status:
            return run_load_sync(
                self.ctx.base_url,
                payloads,
                endpoint=self.endpoint,
                concurrency=level.concurrency,
                api_key=self.ctx.api_key,
                timeout_s=self.bench.timeout_s,
                should_stop=self.ctx.should_stop(server),
                progress=None if quiet else show,
                duration_s=duration_s,
                **options,
            )


def goodput_slos(bench: HttpBenchmarkConfig) -> dict[str, float]:
    slo = bench.slo
    limits = {"ttft": slo.ttft_ms, "tpot": slo.tpot_ms, "e2el": slo.e2el_ms}
    return {name: float(limit) for name, limit in limits.items() if limit is not None}


def warm_up(
    ctx: PhaseContext,
    server: Any,
    payloads: Sequence[dict[str, Any]],
    *,
    endpoint: str,
    concurrency: int,
    timeout_s: float,
) -> None:
    """Send `payloads` (results discarded); every one failing stops the benchmark with the first error."""
    from llmstack.bench.loadgen import run_load_sync

    if not payloads:
        return
    ctx.enter("warm-up")
    logger.info("warm-up: %d requests at concurrency %d", len(payloads), concurrency)
    warm = run_load_sync(
        ctx.base_url,
        list(payloads),
        endpoint=endpoint,
        concurrency=concurrency,
        api_key=ctx.api_key,
        timeout_s=timeout_s,
        should_stop=ctx.should_stop(server),
    )
    interrupts.check()
    if warm.stopped or not all(r.success for r in warm.records):
        check_engine(server, "during the warm-up")
    if not any(r.success for r in warm.records):
        raise BenchmarkError(f"every warm-up request failed; the first error: {warm.records[0].error}")
    ctx.enter("benchmark")


def finish_level(
    ctx: PhaseContext,
    server: Any,
    level: Level,
    result: LoadResult,
    *,
    count_tokens: TokenCounter | None,
    percentiles: Sequence[float],
    slos: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
    chat: bool = False,
) -> dict[str, Any]:
    """Write and print one level's results, add its headline to the summary and save it; then stop the
    run if the level was cut short (a stop signal, a dead engine) or measured nothing.

    Returns the level's full summary (result.json's content).
    """
    from llmstack.bench.loadgen import NOT_SENT
    from llmstack.bench.metrics import summarize_load
    from llmstack.results.text_report import format_load_level, format_seed_report

    signal_stop = result.stopped and interrupts.requested()
    engine_problem = None
    troubled = result.stopped or not all(r.success for r in result.records)
    if server is not None and troubled and not signal_stop:
        engine_problem = server.health_problem()
        if engine_problem is not None:
            # An engine whose process died may still be going down and saying why (torchrun names the rank
            # that failed first): let it, then take its last words.
            server.settle()
            engine_problem = server.health_problem() or engine_problem
    sent = [r for r in result.records if r.error != NOT_SENT]
    measured = dataclasses.replace(result, records=sent)
    summary = summarize_load(measured, count_tokens=count_tokens, goodput_slos=slos, percentiles=percentiles)
    cut_short = None
    if signal_stop:
        cut_short = str(interrupts.interrupted())
    elif engine_problem is not None:
        cut_short = f"the engine failed: {engine_problem}"
    elif result.stopped:
        cut_short = "stopped"
    summary["complete"] = cut_short is None
    summary["cut_short"] = cut_short
    summary["not_sent"] = len(result.records) - len(sent)
    if cut_short is not None:
        summary.update(dict.fromkeys(RATE_KEYS))
    summary.update(provenance(ctx, extra, chat=chat))
    level_dir = level_rundir(ctx, level.label)
    level_dir.write_json("result.json", summary)
    dump_records(level_dir.file("requests.jsonl"), sent)
    report = format_seed_report(
        sent,
        measured.start,
        measured.end,
        concurrency=level.concurrency if level.closed else None,
        request_rate=level.request_rate,
        count_tokens=count_tokens,
    )
    level_dir.write_text("report.txt", report + "\n")
    print(format_load_level(summary, level.label), flush=True)
    for line in _extra_lines(summary):
        print(line, flush=True)
    if cut_short is None:
        print(report, flush=True)
    else:
        logger.warning("load level %s was cut short (%s): no throughput is reported for it", level.label,
                       cut_short)  # fmt: skip
    headline = {k: summary.get(k) for k in HEADLINE_KEYS}
    ctx.summary.setdefault("levels", []).append(
        {
            "label": level.label,
            "concurrency": level.concurrency,
            "request_rate": "inf" if level.closed else level.request_rate,
            **headline,
        }
    )
    ctx.save()
    if signal_stop:
        raise interrupts.interrupted(f"load level {level.label}")
    if engine_problem is not None:
        log = f" (its log is {server.log_path})" if server.log_path else ""
        raise EngineError(
            f"{ctx.plan.engine} failed during load level {level.label}: {engine_problem}{log}; "
            f"{summary['failed']} of {len(sent)} requests failed. The level's results were written, "
            "marked cut short",
            server.log_tail(),
        )
    interrupts.check()
    check_engine(server, f"after load level {level.label}")
    if not summary["completed"]:
        first = next((r.error for r in sent if r.error), "no request was sent")
        raise BenchmarkError(
            f"load level {level.label}: all {len(sent)} requests failed; the first error: {first}"
        )
    return summary


def _extra_lines(summary: Mapping[str, Any]) -> list[str]:
    """What the table has no column for: client queue time (open loop) and goodput (with SLOs)."""
    lines = []
    if summary.get("mean_client_queue_time_ms") is not None:
        lines.append(
            f"client queue time (sent later than scheduled): mean "
            f"{_fmt(summary['mean_client_queue_time_ms'])} ms, p99 "
            f"{_fmt(summary.get('p99_client_queue_time_ms'))} ms; e2el including it: mean "
            f"{_fmt(summary.get('mean_e2el_including_client_queue_ms'))} ms"
        )
    if summary.get("goodput_slos_ms"):
        slos = ", ".join(f"{name} <= {limit:g} ms" for name, limit in summary["goodput_slos_ms"].items())
        lines.append(f"goodput: {_fmt(summary.get('request_goodput'), 2)} requests/s meet {slos}")
    return lines


def _fmt(value: Any, decimals: int = 1) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def print_combined_table(
    ctx: PhaseContext, summaries: Sequence[Mapping[str, Any]], labels: Sequence[str]
) -> None:
    """With several levels, one table of them all, printed and kept as benchmark.txt."""
    from llmstack.results.text_report import format_table

    if len(summaries) < 2:
        return
    table = format_table(summaries, labels)
    ctx.rundir.write_text("benchmark.txt", table + "\n")
    print(f"\nAll load levels ({ctx.run.benchmark.name}):\n{table}", flush=True)


def log_failures(ctx: PhaseContext) -> None:
    failed = sum(level.get("failed") or 0 for level in ctx.summary.get("levels", []))
    if failed:
        logger.warning("%d requests failed; see bench-*/result.json 'error_counts'", failed)
