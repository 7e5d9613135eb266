"""What the phases that measure the live server share: request payloads, warm-up, and one load level's output.

Every level writes `bench-<label>/result.json` (vLLM `bench serve --save-result` keys plus our provenance),
`requests.jsonl` (every request's timestamps and counts) and `report.txt` (the seed's report), prints its
table row and report, and adds its headline numbers to summary.json, which is saved at once.

A level ends early on a stop signal or when the engine dies. It is then written all the same, marked
`"complete": false` with the reason in `cut_short`, without throughputs (its window is not a whole level's),
and the run stops: Interrupted (exit 128 + signal) or EngineError (exit 3). After every level the engine's
health is checked, so that a model process that died under a living API server fails the run too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmstack import interrupts
from llmstack.config.schema import RunConfig
from llmstack.errors import BenchmarkError, EngineError
from llmstack.results.rundir import RunDir
from llmstack.serving.plan import LaunchPlan

if TYPE_CHECKING:
    from llmstack.bench.loadgen import LoadResult, StopCheck
    from llmstack.bench.metrics import TokenCounter

logger = logging.getLogger(__name__)

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
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


def _no_op(*_: object) -> None:
    return None


@dataclass
class PhaseContext:
    run: RunConfig
    plan: LaunchPlan
    rundir: RunDir
    # summary.json's "benchmark" entry; phases add to it as each level finishes, so that a run that fails
    # half-way still records what it measured.
    summary: dict[str, Any]
    # Writes the run's summary.json now (after each level: a launcher killed later loses nothing measured).
    save: Callable[[], None] = field(default=_no_op)
    # Names the run's current phase in summary.json ("warm-up", "benchmark").
    enter: Callable[[str], None] = field(default=_no_op)

    @property
    def base_url(self) -> str:
        return self.plan.probe.base_url

    @property
    def served_name(self) -> str:
        return self.plan.probe.served_name

    @property
    def api_key(self) -> str | None:
        return self.plan.probe.api_key

    def should_stop(self, server: Any | None) -> StopCheck:
        """For the load generator: a stop signal, or a server whose main process has exited (every
        further request would fail at once)."""
        return interrupts.stop_requested_or((lambda: not server.alive()) if server is not None else None)


@dataclass(frozen=True)
class Level:
    """One load level: closed loop (`request_rate` inf, `concurrency` workers) or open loop."""

    label: str
    concurrency: int | None
    request_rate: float = math.inf

    @property
    def closed(self) -> bool:
        return math.isinf(self.request_rate)


def request_payload(
    *,
    model: str,
    endpoint: str,
    content: str | list[dict[str, Any]],
    output_len: int,
    stream: bool,
    ignore_eos: bool,
    min_tokens: int | None,
    temperature: float,
) -> dict[str, Any]:
    """An OpenAI completions or chat body; `content` is a prompt, or a chat message's parts."""
    payload: dict[str, Any] = {"model": model, "max_tokens": output_len, "temperature": temperature}
    payload["stream"] = stream
    if stream:
        # Token counts from the server itself, in the last event.
        payload["stream_options"] = {"include_usage": True}
    if ignore_eos:
        payload["ignore_eos"] = True  # vLLM's sampling extension: no early stop at end-of-sequence
    floor = output_len if min_tokens is None and ignore_eos else (min_tokens or 0)
    if floor:
        # Also vLLM's: belt and braces with ignore_eos, and what ipex-llm's benchmark patch sends.
        payload["min_tokens"] = min(floor, output_len)
    if endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": content}]
    else:
        payload["prompt"] = content
    return payload


def goodput_slos(bench: Any) -> dict[str, float]:
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
) -> dict[str, Any]:
    """Write and print one level's results, add its headline to the summary and save it; then stop the
    run if the level was cut short (a stop signal, a dead engine) or measured nothing.

    Returns the level's full summary (result.json's content).
    """
    from llmstack.bench.loadgen import NOT_SENT
    from llmstack.bench.metrics import summarize_load
    from llmstack.bench.records import dump_records
    from llmstack.bench.report import format_load_level, format_seed_report

    signal_stop = result.stopped and interrupts.requested()
    engine_problem = None
    troubled = result.stopped or not all(r.success for r in result.records)
    if server is not None and troubled and not signal_stop:
        engine_problem = server.health_problem()
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
    summary.update(provenance(ctx, extra))
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
        raise EngineError(
            f"{ctx.plan.engine} failed during load level {level.label}: {engine_problem}; "
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
    from llmstack.bench.report import format_table

    if len(summaries) < 2:
        return
    table = format_table(summaries, labels)
    ctx.rundir.write_text("benchmark.txt", table + "\n")
    print(f"\nAll load levels ({ctx.run.benchmark.name}):\n{table}", flush=True)


def log_failures(ctx: PhaseContext) -> None:
    failed = sum(level.get("failed") or 0 for level in ctx.summary.get("levels", []))
    if failed:
        logger.warning("%d requests failed; see bench-*/result.json 'error_counts'", failed)


def level_rundir(ctx: PhaseContext, label: str) -> RunDir:
    path = ctx.rundir.path / f"bench-{label}"
    path.mkdir(exist_ok=True)
    return RunDir(path)


def provenance(ctx: PhaseContext, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """vLLM's setup keys, and ours under `llmstack` (the whole benchmark config included)."""
    import dataclasses

    run = ctx.run
    endpoint = getattr(run.benchmark, "endpoint", "completions")
    chat = endpoint == "chat" or run.benchmark.phase == "multimodal"
    return {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if chat else "vllm",
        "endpoint_type": "openai-chat" if chat else "openai",
        "model_id": ctx.served_name,
        "tokenizer_id": run.model.tokenizer or run.model.path,
        "llmstack": {
            "engine": ctx.plan.engine,
            "model": run.model.name,
            "low_bit": run.low_bit.name,
            "device": run.device.name,
            "benchmark": dataclasses.asdict(run.benchmark),
            **(extra or {}),
        },
    }


def check_engine(server: Any | None, when: str) -> None:
    """Stop on a stop signal; fail (EngineError, exit 3) if the engine is not healthy."""
    interrupts.check()
    if server is not None:
        server.check_healthy(when)


def load_tokenizer(ctx: PhaseContext) -> Any | None:
    from llmstack.bench.prompts import load_tokenizer as load

    return load(ctx.run.model.tokenizer or str(ctx.run.model.path))


def progress_bar(label: str) -> Callable[[int, int], None] | None:
    """A one-line bar on a terminal (requests done of total); None when stderr is not one."""
    if not sys.stderr.isatty():
        return None
    width = 30

    def show(done: int, total: int) -> None:
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r  {label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def timed_progress_bar(label: str, duration_s: float) -> Callable[[int, int], None] | None:
    """A one-line bar on a terminal for a run of fixed duration: time elapsed, requests done so far."""
    if not sys.stderr.isatty():
        return None
    width = 30
    started = time.perf_counter()

    def show(done: int, _total: int) -> None:
        # The load generator calls at most ten times a second: at thousands of requests/s the terminal
        # would be the bottleneck.
        elapsed = time.perf_counter() - started
        fraction = min(1.0, elapsed / duration_s)
        filled = int(width * fraction)
        sys.stderr.write(
            f"\r  {label} [{'#' * filled}{'.' * (width - filled)}] {min(elapsed, duration_s):.0f}/"
            f"{duration_s:.0f} s, {done} requests"
        )
        sys.stderr.flush()

    return show


def end_progress_line() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\n")
        sys.stderr.flush()
