"""The capacity phase (`benchmark=capacity`): the highest load at which the SLOs hold, against a live server.

`load` picks what is searched: `request_rate` (open loop, requests/s) or `concurrency` (closed loop, requests
in flight), over the range that key gives ([lowest, highest]). Each probe is one load level of the online
phase (`num_prompts` requests, or `duration_s` seconds, after `probe_warmup_requests` unmeasured ones),
written as `bench-<probe>/` like any level; its verdict holds the level's metrics against `benchmark.slo`.
The search itself (bracketing, narrowing, the resolution rule, the confirm probe, the early stop of a
plainly overloaded probe) is `llmstack.phases.capacity_search`.

summary.json's `benchmark.capacity` is the one number a sweep reads: the load found (requests/s or requests
in flight, as `benchmark.load` says; null when even the lowest load fails). `benchmark.search` has the rest:
the outcome, the throughput and concurrency at the capacity, every probe with its verdict. The run directory
also gets summary.md (the capacity in its first lines) and capacity.png (load vs each SLO'd metric).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any, Optional

from llmstack.config.schema import RunConfig
from llmstack.errors import ConfigError
from llmstack.phases import online
from llmstack.phases.capacity_search import (
    METHODS,
    PERCENTILE_SLOS,
    SLO_PERCENTILES,
    OverloadRule,
    OverloadWatch,
    SearchSettings,
    Verdict,
    percentile_slos,
    search,
    verdict_of,
)
from llmstack.phases.common import Level, PhaseContext, check_engine
from llmstack.phases.http_options import SloConfig, at_least, positive_seconds
from llmstack.phases.online import OnlineBenchmarkConfig, OnlinePhase
from llmstack.phases.runner import finish_level, goodput_slos, print_combined_table, warm_up

if TYPE_CHECKING:
    from llmstack.bench.loadgen import LoadResult

logger = logging.getLogger(__name__)

LOAD_CHOICES = ("request_rate", "concurrency")
# A closed-loop probe of num_prompts requests sends at least this many per client.
CLOSED_LOOP_ROUNDS = 4


@dataclass
class CapacitySloConfig(SloConfig):
    """The online phase's per-request goodput limits (ttft_ms, tpot_ms, e2el_ms), and the capacity's SLOs:
    percentiles of a probe's latencies (ms), and the least fraction of its requests that must be good."""

    p50_ttft_ms: Optional[float] = None
    p90_ttft_ms: Optional[float] = None
    p99_ttft_ms: Optional[float] = None
    p50_tpot_ms: Optional[float] = None
    p90_tpot_ms: Optional[float] = None
    p99_tpot_ms: Optional[float] = None
    p50_itl_ms: Optional[float] = None
    p90_itl_ms: Optional[float] = None
    p99_itl_ms: Optional[float] = None
    p50_e2el_ms: Optional[float] = None
    p90_e2el_ms: Optional[float] = None
    p99_e2el_ms: Optional[float] = None
    # Fraction (0-1] of a probe's requests that must meet ttft_ms/tpot_ms/e2el_ms (at least one given).
    min_goodput: Optional[float] = None


@dataclass
class CapacityBenchmarkConfig(OnlineBenchmarkConfig):
    phase: str = "capacity"
    # request_rate (open loop) | concurrency (closed loop): which key the search moves.
    load: str = "request_rate"
    # The range searched, [lowest, highest], of the key `load` names; the search starts at the lowest.
    request_rate: list[float] = field(default_factory=lambda: [1.0, 64.0])
    concurrency: list[int] = field(default_factory=lambda: [1, 64])
    # Bracketing: each probe's load is the previous one's times this, until a probe fails.
    growth: float = 2.0
    # Narrowing stops when the highest passing and lowest failing loads are within this fraction.
    resolution: float = 0.05
    # bisect (geometric midpoint) | fit (where the worst SLO ratio, fitted in log-log, crosses 1)
    method: str = "bisect"
    max_probes: int = 20
    # Requests per probe (closed loop: at least 4 per client; with duration_s: the prompt pool).
    num_prompts: int = 60
    # The first requests of every probe, sent at its load but not measured (the queue fills up).
    probe_warmup_requests: int = 0
    # A confirm probe at the capacity found, which must pass again.
    confirm: bool = True
    # Stop a probe once it is plainly over capacity (capacity_search.OverloadRule says when).
    stop_early: bool = True
    stop_ttft_factor: float = 3.0
    stop_ttft_successive: int = 5
    stop_backlog_growth: float = 0.25
    stop_backlog_min: int = 8
    stop_min_elapsed_s: float = 1.0
    slo: CapacitySloConfig = field(default_factory=CapacitySloConfig)


CONFIG = CapacityBenchmarkConfig


def problems(run: RunConfig, b: CapacityBenchmarkConfig) -> Iterator[ConfigError]:
    yield from online.problems(run, b)
    if b.load not in LOAD_CHOICES:
        yield ConfigError("benchmark.load", b.load, "is not a load key to search.", LOAD_CHOICES)
        return
    span = b.request_rate if b.load == "request_rate" else b.concurrency
    if len(span) != 2 or not 0 < span[0] <= span[1]:
        yield ConfigError(
            f"benchmark.{b.load}",
            span,
            "is the range searched: [lowest, highest], 0 < lowest <= highest.",
            hint=f"For example benchmark.{b.load}=[1,64].",
        )
    if b.load == "concurrency":
        yield from at_least("benchmark.concurrency", min(span, default=1), 1)
        if b.max_concurrency is not None:
            yield ConfigError("benchmark.max_concurrency", b.max_concurrency,
                              "caps open-loop probes only, and benchmark.load is concurrency.")  # fmt: skip
    if not (b.growth > 1 and math.isfinite(b.growth)):
        yield ConfigError("benchmark.growth", b.growth, "must be a finite factor above 1.")
    if not 0 < b.resolution < 1:
        yield ConfigError("benchmark.resolution", b.resolution, "must be a fraction in (0, 1), e.g. 0.05.")
    if b.method not in METHODS:
        yield ConfigError("benchmark.method", b.method, "is not a narrowing method.", METHODS)
    yield from at_least("benchmark.max_probes", b.max_probes, 2)
    yield from at_least("benchmark.probe_warmup_requests", b.probe_warmup_requests, 0)
    yield from slo_problems(b)
    for key in ("stop_ttft_factor", "stop_backlog_growth"):
        if not getattr(b, key) > 0:
            yield ConfigError(f"benchmark.{key}", getattr(b, key), "must be positive.")
    yield from at_least("benchmark.stop_ttft_successive", b.stop_ttft_successive, 1)
    yield from at_least("benchmark.stop_backlog_min", b.stop_backlog_min, 1)
    yield from positive_seconds("benchmark.stop_min_elapsed_s", b.stop_min_elapsed_s)


def slo_problems(b: CapacityBenchmarkConfig) -> Iterator[ConfigError]:
    slo = b.slo
    limits = percentile_slos(slo)
    for key, limit in limits.items():
        if not (limit > 0 and math.isfinite(limit)):
            yield ConfigError(f"benchmark.slo.{key}", limit, "must be a positive number of ms, or null.")
        elif not b.stream and not key.endswith("_e2el_ms"):
            yield ConfigError(
                f"benchmark.slo.{key}", limit, "needs streamed requests (benchmark.stream=true)."
            )
    if slo.min_goodput is not None:
        if not 0 < slo.min_goodput <= 1:
            yield ConfigError("benchmark.slo.min_goodput", slo.min_goodput, "is a fraction in (0, 1].")
        if not goodput_slos(b):
            yield ConfigError(
                "benchmark.slo.min_goodput",
                slo.min_goodput,
                "needs a per-request limit that makes a request good.",
                hint="Give benchmark.slo.ttft_ms, tpot_ms or e2el_ms too.",
            )
    if not limits and slo.min_goodput is None:
        yield ConfigError(
            "benchmark.slo",
            "{}",
            "gives no SLO, so no load can fail and there is no capacity to find.",
            ["min_goodput", *PERCENTILE_SLOS],
            hint="For example benchmark.slo.p99_ttft_ms=500.",
        )


def host_problems(run: RunConfig, b: CapacityBenchmarkConfig) -> Iterator[ConfigError]:
    yield from online.host_problems(run, b)


def prepare(ctx: PhaseContext) -> CapacityPhase:
    return CapacityPhase(ctx)


class CapacityPhase(OnlinePhase):
    def __init__(self, ctx: PhaseContext) -> None:
        super().__init__(ctx)
        bench = ctx.run.benchmark
        assert isinstance(bench, CapacityBenchmarkConfig)
        self.bench: CapacityBenchmarkConfig = bench
        self.open_loop = bench.load == "request_rate"
        low, high = bench.request_rate if self.open_loop else bench.concurrency
        self.settings = SearchSettings(
            low=float(low), high=float(high), growth=bench.growth, resolution=bench.resolution,
            method=bench.method, integer=not self.open_loop, max_probes=bench.max_probes,
            confirm=bench.confirm,
        )  # fmt: skip
        ttft_limits = [v for k, v in percentile_slos(bench.slo).items() if "_ttft_" in k]
        self.rule = OverloadRule(
            ttft_limit_s=max(ttft_limits) / 1000 if ttft_limits else None,
            ttft_factor=bench.stop_ttft_factor,
            ttft_successive=bench.stop_ttft_successive,
            backlog_growth=bench.stop_backlog_growth,
            backlog_min=bench.stop_backlog_min,
            min_elapsed_s=bench.stop_min_elapsed_s,
        )
        # The percentiles the SLOs name are always computed.
        self.percentiles = sorted({*bench.percentiles, *map(float, SLO_PERCENTILES)})
        self.levels = []
        self.summaries: list[dict[str, Any]] = []
        self.probes: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        ctx.summary.update({"load": bench.load, "capacity": None, "search": {}})

    def run(self, server: Any) -> None:
        from llmstack.phases.capacity_report import search_record, write_report

        ctx, bench = self.ctx, self.bench
        first = int(self.settings.low) if not self.open_loop else (bench.max_concurrency or 4)
        warm_up(ctx, server, self.warmup_payloads, endpoint=self.endpoint, timeout_s=bench.timeout_s,
                concurrency=max(1, min(len(self.warmup_payloads), first)))  # fmt: skip
        result = search(lambda load, role: self.probe(load, role, server), self.settings)
        if not self.open_loop:  # whole requests in flight, written as such
            result.capacity = None if result.capacity is None else int(result.capacity)
            result.failed_above = None if result.failed_above is None else int(result.failed_above)
        ctx.summary["capacity"] = result.capacity
        ctx.summary["search"] = search_record(self, result)
        ctx.save()
        print_combined_table(ctx, self.summaries, [p["label"] for p in self.probes])
        write_report(self, result)

    def probe(self, load: float, role: str, server: Any) -> Verdict:
        """One probe: a load level measured and written as the online phase writes one, then its verdict."""
        bench = self.bench
        number = len(self.probes) + 1
        shown = f"r{load:.4g}" if self.open_loop else f"c{int(load)}"
        label = f"{'confirm' if role == 'confirm' else f'p{number:02d}'}-{shown}"
        level = Level(label, bench.max_concurrency, load) if self.open_loop else Level(label, int(load))
        check_engine(server, f"before probe {label}")
        self.stop_reason = None
        result = self.measure(level, server)
        summary = finish_level(
            self.ctx,
            server,
            level,
            result,
            count_tokens=self.count_tokens,
            percentiles=self.percentiles,
            slos=goodput_slos(bench),
            extra={"capacity_probe": {"load": load, "role": role, "stopped_early": self.stop_reason}},
            chat=self.endpoint_name == "chat",
        )
        verdict = verdict_of(summary, bench.slo, self.stop_reason)
        if self.stop_reason is not None:
            # The level's headline says why it was cut short in words (finish_level wrote "stopped").
            self.ctx.summary["levels"][-1]["cut_short"] = self.stop_reason
        duration = summary.get("duration") or 0.0
        busy = (summary.get("mean_e2el_ms") or 0.0) / 1000 * (summary.get("completed") or 0)
        self.probes.append({
            "label": label, "load": load if self.open_loop else int(load), "role": role,
            "passed": verdict.passed, "failed": list(verdict.failed), "ratio": verdict.ratio,
            "stopped_early": self.stop_reason,
            "request_throughput": summary.get("request_throughput"),
            "output_throughput": summary.get("output_throughput"),
            # Little's law over the window: requests in flight at the server, on average.
            "mean_in_flight": busy / duration if duration > 0 and self.stop_reason is None else None,
            "max_in_flight": summary.get("max_concurrent_requests"),
            **{key: summary.get(key) for key in percentile_slos(bench.slo)},
            "goodput_fraction": _goodput_fraction(summary),
        })  # fmt: skip
        self.summaries.append(summary)
        self.ctx.summary["search"] = {"probes": self.probes}
        self.ctx.save()
        word = "pass" if verdict.passed else "FAIL (" + "; ".join(verdict.failed) + ")"
        unit = "requests/s" if self.open_loop else "in flight"
        print(f"capacity probe {number} ({role}) at {load:.4g} {unit}: {word}", flush=True)
        return verdict

    def measure(self, level: Level, server: Any) -> LoadResult:
        """The online phase's level (requests or seconds), with `probe_warmup_requests` more in front,
        which are then left out."""
        bench = self.bench
        warm = bench.probe_warmup_requests
        if bench.duration_s is not None and level.closed:
            result = self.load(
                level, server, self.payloads, duration_s=bench.duration_s, input_lens=self.input_lens
            )
            return _without_first(result, warm)
        count = bench.num_prompts
        if bench.duration_s is not None:
            count = max(1, math.ceil(level.request_rate * bench.duration_s))
        elif level.closed:
            # Every client sends a few: with fewer requests than clients the load is one burst, never C.
            count = max(count, CLOSED_LOOP_ROUNDS * int(level.concurrency or 1))
        count += warm
        payloads = [self.payloads[i % len(self.payloads)] for i in range(count)]
        input_lens = [self.input_lens[i % len(self.input_lens)] for i in range(count)]
        options: dict[str, Any] = {}
        if not level.closed:
            options = {"request_rate": level.request_rate, "burstiness": bench.burstiness, "seed": bench.seed}
        return _without_first(self.load(level, server, payloads, input_lens=input_lens, **options), warm)

    def load(self, level: Level, server: Any, payloads: Any, *, duration_s: float | None = None,
             quiet: bool = False, **options: Any) -> LoadResult:  # fmt: skip
        """HttpPhase.load, watched: the progress reports and the stop check also feed the OverloadWatch,
        which stops the probe once it is plainly over capacity."""
        from llmstack.bench.loadgen import arrival_offsets, run_load_sync
        from llmstack.progress import StatusLine

        rate = options.get("request_rate", math.inf)
        arrivals = None
        if not math.isinf(rate):
            arrivals = arrival_offsets(len(payloads), rate, options["burstiness"], options["seed"])
        # The load starts a moment later (connections opened first): a constant offset, which the backlog
        # rule (growth between two times) does not see.
        watch = OverloadWatch(self.rule, perf_counter(), arrivals) if self.bench.stop_early else None
        status = StatusLine(f"capacity probe {level.label}")
        base_stop = self.ctx.should_stop(server)

        def show(done: int, total: int, ttft_s: float | None) -> None:
            if not quiet:
                status.update(done=done, total=total or None, ttft_s=ttft_s)
            if watch is not None:
                watch.completed(done, ttft_s)

        def should_stop() -> bool:
            if base_stop():
                return True
            return watch is not None and watch.over_capacity(perf_counter()) is not None

        with status:
            result = run_load_sync(
                self.ctx.base_url, payloads, endpoint=self.endpoint, concurrency=level.concurrency,
                api_key=self.ctx.api_key, timeout_s=self.bench.timeout_s, should_stop=should_stop,
                progress=show, duration_s=duration_s, **options,
            )  # fmt: skip
        if watch is not None and watch.reason is not None and result.stopped:
            self.stop_reason = watch.reason
            logger.info("probe %s stopped early: %s", level.label, watch.reason)
        return result


def _without_first(result: LoadResult, count: int) -> LoadResult:
    """The result without its first `count` requests (in send order); the window starts at the next one's
    scheduled (open loop) or send time."""
    if count <= 0 or len(result.records) <= count:
        return result
    kept = result.records[count:]
    starts = [
        t for r in kept if (t := r.scheduled_at if r.scheduled_at is not None else r.sent_at) is not None
    ]
    start = min(starts) if starts else result.start
    return dataclasses.replace(result, records=kept, start=start)


def _goodput_fraction(summary: dict[str, Any]) -> float | None:
    if summary.get("request_goodput") is None or not summary.get("num_prompts"):
        return None
    return summary["request_goodput"] * summary["duration"] / summary["num_prompts"]
