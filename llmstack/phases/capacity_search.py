"""The capacity search, apart from any server: bracketing and narrowing over a probe function, the
resolution rule, the linear sweep it is measured against, and the rule that stops a plainly overloaded probe.

A probe function takes a load (requests/s in open loop, requests in flight in closed loop) and says whether
the SLOs held there (`Verdict`). The search assumes the verdict is monotone in the load (passes below some
boundary, fails above it) and finds the boundary in two steps:

1. Bracketing: probe the lowest load of the range, then multiply the load by `growth` until a probe fails
   (or the top of the range passes). A failing lowest load: the capacity is below the range.
2. Narrowing: keep the highest passing load `lo` and the lowest failing one `hi`, and probe between them:
   at their geometric mean (`bisect`), or where the worst SLO ratio, fitted linearly in log-log between the
   two, crosses 1 (`fit`: regula falsi, kept 15 % inside the bracket and alternated with a bisection when
   one side stays put), until the bracket is resolved.

Resolution rule: the bracket is resolved when `hi <= lo * (1 + resolution)` (integer loads: also when
`hi - lo <= 1`). The boundary b lies in (lo, hi], so the reported capacity `lo` is within `resolution` of it:
(b - lo) / b < (hi - lo) / lo <= resolution.

Then a confirm probe at `lo` must pass again; one that fails (noise near the boundary) counts as a failure
there, and the search narrows below it (also when `lo` was the top of the range). Every probe counts
against `max_probes`.
"""

from __future__ import annotations

import bisect as _bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "METHODS",
    "PERCENTILE_SLOS",
    "OverloadRule",
    "OverloadWatch",
    "Probe",
    "SearchResult",
    "SearchSettings",
    "Verdict",
    "linear_sweep",
    "percentile_slos",
    "resolved",
    "search",
    "sweep_loads",
    "verdict_of",
]

METHODS = ("bisect", "fit")
SLO_PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "itl", "e2el")
# The SLOs on latency percentiles: p50_ttft_ms ... p99_e2el_ms, as the online summary's keys.
PERCENTILE_SLOS = tuple(f"p{p}_{m}_ms" for m in SLO_METRICS for p in SLO_PERCENTILES)
# The fit's guess is kept this far (a fraction of the bracket's log width) from either end.
_FIT_GUARD = 0.15


@dataclass(frozen=True)
class Verdict:
    """A probe's outcome: whether every SLO held; `ratio` the worst observed/limit (<= 1 passes; None when
    unknown, e.g. a probe stopped early); `failed` what failed, in words."""

    passed: bool
    ratio: float | None = None
    failed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Probe:
    load: float
    verdict: Verdict
    # bracket | narrow | confirm
    role: str


ProbeFunction = Callable[[float, str], Verdict]


@dataclass(frozen=True)
class SearchSettings:
    low: float
    high: float
    growth: float = 2.0
    resolution: float = 0.05
    method: str = "bisect"
    # Closed loop: loads are whole numbers of requests in flight.
    integer: bool = False
    max_probes: int = 30
    confirm: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high or not math.isfinite(self.high):
            raise ValueError(f"the range must be 0 < low <= high, got [{self.low}, {self.high}]")
        if not self.growth > 1 or not self.resolution > 0 or self.method not in METHODS:
            raise ValueError(f"bad search settings: {self}")


@dataclass
class SearchResult:
    # The highest load that passed, within `resolution` of the boundary when `outcome` is "found".
    capacity: float | None
    # found | below_range (the lowest load failed) | at_least (the highest passed) | unresolved (max_probes)
    outcome: str
    # The lowest load that failed above it (None when none did).
    failed_above: float | None
    probes: list[Probe] = field(default_factory=list)
    # The confirm probe at the capacity passed (None: none was run).
    confirmed: bool | None = None


def resolved(lo: float, hi: float, settings: SearchSettings) -> bool:
    """The resolution rule (see the module's docstring)."""
    if settings.integer and hi - lo <= 1:
        return True
    return hi <= lo * (1 + settings.resolution)


def search(probe: ProbeFunction, settings: SearchSettings) -> SearchResult:
    """Bracket, narrow, confirm (see the module's docstring)."""
    probes: list[Probe] = []

    def run(load: float, role: str) -> Verdict:
        verdict = probe(load, role)
        probes.append(Probe(load, verdict, role))
        return verdict

    def budget() -> bool:
        return len(probes) < settings.max_probes

    lo: float | None = None
    hi: float | None = None
    load = _load(settings.low, settings)
    while budget():
        if run(load, "bracket").passed:
            lo = load
            if load >= settings.high:
                break
            grown = _load(min(load * settings.growth, settings.high), settings)
            load = max(grown, load + 1) if settings.integer else grown  # 1 x 1.2 is still 1 whole request
        else:
            hi = load
            break
    if lo is None:
        return SearchResult(None, "below_range" if hi is not None else "unresolved", hi, probes)
    if hi is None and lo < settings.high:
        return SearchResult(lo, "unresolved", None, probes)
    while True:
        if hi is not None:
            while not resolved(lo, hi, settings) and budget():
                load = _next_load(lo, hi, probes, settings)
                if run(load, "narrow").passed:
                    lo = load
                else:
                    hi = load
            if not resolved(lo, hi, settings):
                return SearchResult(lo, "unresolved", hi, probes)
        confirmed = _confirm(run, lo, settings, budget)
        if confirmed is not False:
            return SearchResult(lo, "found" if hi is not None else "at_least", hi, probes, confirmed)
        # The capacity failed when probed again: a failure there; the next passing load below is the new lo.
        hi = lo
        below = [p.load for p in probes if p.verdict.passed and p.load < hi]
        if not below:
            return SearchResult(None, "below_range", hi, probes, False)
        lo = max(below)


def _confirm(
    run: ProbeFunction, lo: float, settings: SearchSettings, budget: Callable[[], bool]
) -> bool | None:
    if not settings.confirm or not budget():
        return None
    return run(lo, "confirm").passed


def _load(value: float, settings: SearchSettings) -> float:
    return float(max(1, round(value))) if settings.integer else value


def _next_load(lo: float, hi: float, probes: Sequence[Probe], settings: SearchSettings) -> float:
    """The next load inside (lo, hi): the geometric mean, or the fit's guess (see the module's docstring)."""
    frac = 0.5
    if settings.method == "fit":
        frac = _fit_fraction(lo, hi, probes)
    value = math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo)))
    if settings.integer:
        return float(min(hi - 1, max(lo + 1, round(value))))
    return value


def _fit_fraction(lo: float, hi: float, probes: Sequence[Probe]) -> float:
    """Where, as a fraction of the bracket's log width, the worst SLO ratio fitted in log-log crosses 1."""
    narrowing = [p for p in probes if p.role == "narrow"]
    if len(narrowing) >= 2 and narrowing[-1].verdict.passed == narrowing[-2].verdict.passed:
        return 0.5  # one end has stayed put twice: a bisection moves it
    r_lo = _ratio_at(lo, probes, passed=True)
    r_hi = _ratio_at(hi, probes, passed=False)
    if r_lo is None or r_hi is None or not r_hi > 1 >= r_lo > 0:
        return 0.5
    frac = -math.log(r_lo) / (math.log(r_hi) - math.log(r_lo))
    return min(1 - _FIT_GUARD, max(_FIT_GUARD, frac))


def _ratio_at(load: float, probes: Sequence[Probe], *, passed: bool) -> float | None:
    for p in reversed(probes):
        if p.load == load and p.verdict.passed == passed:
            return p.verdict.ratio
    return None


def sweep_loads(settings: SearchSettings) -> list[float]:
    """The linear sweep at the same resolution over the same range: low, low*(1+resolution), ... up to high
    (integer loads: each whole number once), the grid whose first failure locates the boundary as well."""
    loads = [_load(settings.low, settings)]
    while loads[-1] < settings.high:
        step = loads[-1] * (1 + settings.resolution)
        # Whole numbers: the next one the resolution rule still separates (never the same one twice).
        step = float(max(loads[-1] + 1, math.floor(step))) if settings.integer else step
        loads.append(min(step, _load(settings.high, settings)))
    return loads


def linear_sweep(probe: ProbeFunction, settings: SearchSettings) -> SearchResult:
    """Probe `sweep_loads` in order until one fails: the baseline the search is measured against."""
    probes: list[Probe] = []
    lo: float | None = None
    for load in sweep_loads(settings):
        verdict = probe(load, "sweep")
        probes.append(Probe(load, verdict, "sweep"))
        if not verdict.passed:
            return SearchResult(lo, "found" if lo is not None else "below_range", load, probes)
        lo = load
    return SearchResult(lo, "at_least", None, probes)


@dataclass(frozen=True)
class OverloadRule:
    """When a probe is plainly over capacity, from what its requests show while it runs.

    - TTFT: `ttft_successive` successive completions, as the load's progress reports them, each waited more
      than `ttft_factor` x the highest TTFT limit of the SLOs (none: this test is off).
    - Backlog (open loop): after `min_elapsed_s`, the requests in flight (arrived by the schedule, not yet
      finished) have grown, since half the time elapsed so far, by at least `backlog_min` and by more than
      `backlog_growth` of the requests that arrived meanwhile: the server finishes clearly fewer than arrive,
      and the queue grows without bound.

    A probe is stopped only after `min_done` requests have finished, so that it always has some to report.
    """

    ttft_limit_s: float | None = None
    ttft_factor: float = 3.0
    ttft_successive: int = 5
    backlog_growth: float = 0.25
    backlog_min: int = 8
    min_elapsed_s: float = 1.0
    min_done: int = 1


class OverloadWatch:
    """The `OverloadRule` applied to one probe. Times are seconds on one clock, `t0` the probe's start;
    `arrivals` the open loop's scheduled send times after t0 (None in closed loop)."""

    def __init__(self, rule: OverloadRule, t0: float, arrivals: Sequence[float] | None = None) -> None:
        self.rule = rule
        self.t0 = t0
        self.arrivals = list(arrivals) if arrivals is not None else None
        self.done = 0
        self.slow_streak = 0
        # (elapsed, requests in flight), one per check: the backlog's history.
        self.backlog: list[tuple[float, int]] = []
        self.reason: str | None = None

    def completed(self, done: int, ttft_s: float | None) -> None:
        """A progress report: requests finished so far, the latest one's TTFT (None: unknown)."""
        self.done = done
        limit = self.rule.ttft_limit_s
        if limit is None or ttft_s is None:
            return
        if ttft_s > self.rule.ttft_factor * limit:
            self.slow_streak += 1
        else:
            self.slow_streak = 0

    def over_capacity(self, now: float) -> str | None:
        """Why the probe is plainly over capacity, or None; once said, said again."""
        if self.reason is not None:
            return self.reason
        rule = self.rule
        if self.done < rule.min_done:
            return None
        if rule.ttft_limit_s is not None and self.slow_streak >= rule.ttft_successive:
            self.reason = (
                f"over capacity: {self.slow_streak} successive requests waited more than "
                f"{rule.ttft_factor:g} x the TTFT limit ({rule.ttft_limit_s * 1000:g} ms) for a first token"
            )
            return self.reason
        if self.arrivals is None:
            return None
        elapsed = now - self.t0
        arrived = _bisect.bisect_right(self.arrivals, elapsed)
        in_flight = arrived - self.done
        self.backlog.append((elapsed, in_flight))
        if elapsed < rule.min_elapsed_s:
            return None
        half = elapsed / 2
        i = _bisect.bisect_right(self.backlog, (half, math.inf)) - 1
        if i < 0:
            return None
        then, earlier = self.backlog[i]
        grown = in_flight - earlier
        arrived_since = arrived - _bisect.bisect_right(self.arrivals, then)
        if grown >= rule.backlog_min and grown > rule.backlog_growth * arrived_since:
            self.reason = (
                f"over capacity: requests in flight grew from {earlier} to {in_flight} in "
                f"{elapsed - then:.1f} s ({grown} of the {arrived_since} that arrived meanwhile not served)"
            )
        return self.reason


def percentile_slos(slo: Any) -> dict[str, float]:
    return {key: float(v) for key in PERCENTILE_SLOS if (v := getattr(slo, key)) is not None}


def verdict_of(summary: dict[str, Any], slo: Any, stopped: str | None = None) -> Verdict:
    """A probe's level summary against the SLOs: every limit must hold, no request may fail, and a probe
    stopped early fails (its ratio unknown)."""
    failed: list[str] = []
    ratios: list[float] = []
    for key, limit in percentile_slos(slo).items():
        observed = summary.get(key)
        if observed is None:
            failed.append(f"{key} not measured")
            continue
        ratios.append(observed / limit)
        if observed > limit:
            failed.append(f"{key} {observed:.1f} > {limit:g}")
    sent = summary.get("num_prompts") or 0
    if slo.min_goodput is not None:
        good = (summary.get("request_goodput") or 0.0) * (summary.get("duration") or 0.0)
        fraction = good / sent if sent else 0.0
        ratios.append(slo.min_goodput / fraction if fraction > 0 else math.inf)
        if fraction < slo.min_goodput - 1e-9:
            failed.append(f"goodput {fraction:.1%} < {slo.min_goodput:.0%}")
    if stopped is not None:
        # Its unfinished requests were cancelled by the stop: not failures of the server's.
        return Verdict(False, None, (f"stopped early: {stopped}", *failed))
    if summary.get("failed"):
        failed.append(f"{summary['failed']} of {sent} requests failed")
    return Verdict(not failed, max(ratios) if ratios else None, tuple(failed))
