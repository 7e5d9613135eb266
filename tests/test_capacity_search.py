"""The capacity search without a server: bracketing and narrowing on probe functions whose boundary is known,
the resolution rule, the confirm probe, the linear sweep it is measured against, the SLO verdict, and the
early-stop rule on simulated probes (over and under capacity)."""

from __future__ import annotations

import math
import random
from itertools import pairwise
from types import SimpleNamespace

import pytest

from llmstack.phases.capacity_search import (
    OverloadRule,
    OverloadWatch,
    SearchSettings,
    Verdict,
    linear_sweep,
    resolved,
    search,
    sweep_loads,
    verdict_of,
)
from tests.capacity_stub import StubModel, percentile


def threshold(boundary: float, *, ratio_slope: float = 1.0):
    """Passes at loads <= boundary; the SLO ratio grows as (load / boundary) ** slope."""

    def probe(load: float, role: str) -> Verdict:
        ratio = (load / boundary) ** ratio_slope
        return Verdict(load <= boundary, ratio, () if load <= boundary else ("p99_ttft_ms",))

    return probe


def bound_on_probes(settings: SearchSettings, boundary: float) -> int:
    """Bracketing to the first failure, bisection of a bracket of width `growth` down to the resolution (in
    log space), and the confirm probe."""
    bracket = math.ceil(math.log(boundary / settings.low, settings.growth)) + 1
    narrow = math.ceil(math.log2(math.log(settings.growth) / math.log(1 + settings.resolution))) + 1
    return bracket + narrow + 1


@pytest.mark.parametrize("method", ["bisect", "fit"])
@pytest.mark.parametrize("boundary", [1.7, 3.0, 9.99, 33.3, 47.0, 120.0])
def test_open_loop_finds_the_boundary_within_the_resolution(method: str, boundary: float) -> None:
    settings = SearchSettings(low=1.0, high=256.0, resolution=0.05, method=method)
    result = search(threshold(boundary, ratio_slope=4.0), settings)
    assert result.outcome == "found" and result.confirmed is True
    assert boundary * (1 - settings.resolution) <= result.capacity <= boundary
    assert result.failed_above is not None and resolved(result.capacity, result.failed_above, settings)
    assert len(result.probes) <= bound_on_probes(settings, boundary)
    assert [p.role for p in result.probes][-1] == "confirm"


@pytest.mark.parametrize("boundary", [1, 2, 5, 6, 17, 40])
def test_closed_loop_finds_the_integer_boundary_exactly(boundary: int) -> None:
    settings = SearchSettings(low=1, high=64, resolution=0.05, integer=True)
    result = search(threshold(boundary), settings)
    assert result.outcome == "found"
    assert result.capacity == boundary  # hi - lo <= 1: whole numbers have no finer resolution
    assert all(float(p.load).is_integer() for p in result.probes)
    assert len(result.probes) <= bound_on_probes(settings, boundary) + 1


def test_the_stub_model_boundary_is_found_for_open_and_closed_loops() -> None:
    model = StubModel(slots=4, prefill_s=0.05, token_s=0.01, output_len=8)

    def open_probe(rate: float, role: str) -> Verdict:
        p90 = percentile(model.open_loop_ttfts(rate, 60), 90)
        return Verdict(p90 <= 0.1, p90 / 0.1)

    def closed_probe(concurrency: float, role: str) -> Verdict:
        p99 = percentile(model.closed_loop_ttfts(int(concurrency), 60), 99)
        return Verdict(p99 <= 0.1, p99 / 0.1)

    opened = search(open_probe, SearchSettings(low=2, high=128))
    # Under even arrivals no request waits up to slots / service time (33.3 req/s); above, the queue grows.
    assert 4 / model.service_s * 0.95 <= opened.capacity <= 4 / model.service_s * 1.05
    closed = search(closed_probe, SearchSettings(low=1, high=64, integer=True))
    assert closed.capacity == 4  # one request more than the slots, and one in five waits a whole service


def test_a_noisy_monotone_probe_still_converges_near_the_boundary() -> None:
    rng = random.Random(7)
    boundary = 25.0

    def noisy(load: float, role: str) -> Verdict:
        ratio = (load / boundary) ** 3 * rng.uniform(0.97, 1.03)  # +-3 % noise on the margin
        return Verdict(ratio <= 1, ratio)

    for method in ("bisect", "fit"):
        for _ in range(20):
            result = search(noisy, SearchSettings(low=1, high=256, method=method))
            assert result.outcome == "found"
            assert boundary * 0.93 <= result.capacity <= boundary * 1.03
            assert len(result.probes) <= 20


def test_a_failing_confirm_narrows_below_it() -> None:
    calls = {"n": 0}

    def flaky(load: float, role: str) -> Verdict:
        if role == "confirm" and calls["n"] == 0:
            calls["n"] += 1
            return Verdict(False, 1.1, ("p99_ttft_ms",))
        return Verdict(load <= 10, load / 10)

    result = search(flaky, SearchSettings(low=1, high=64))
    roles = [p.role for p in result.probes]
    assert roles.count("confirm") == 2 and result.confirmed is True
    first_confirm = result.probes[roles.index("confirm")].load
    assert result.capacity < first_confirm and result.failed_above <= first_confirm


def test_a_small_growth_still_grows_whole_numbers() -> None:
    result = search(threshold(5), SearchSettings(low=1, high=64, growth=1.2, integer=True))
    assert [p.load for p in result.probes] == [1, 2, 3, 4, 5, 6, 5]


def test_outcomes_at_the_ends_of_the_range_and_out_of_probes() -> None:
    below = search(threshold(0.5), SearchSettings(low=1, high=64))
    assert (below.capacity, below.outcome, len(below.probes)) == (None, "below_range", 1)
    above = search(threshold(1000), SearchSettings(low=1, high=64))
    assert (above.capacity, above.outcome, above.confirmed) == (64, "at_least", True)
    assert [p.load for p in above.probes] == [1, 2, 4, 8, 16, 32, 64, 64]
    short = search(threshold(20), SearchSettings(low=1, high=64, max_probes=7))
    assert short.outcome == "unresolved" and len(short.probes) == 7 and 16 <= short.capacity <= 20


def test_the_linear_sweep_is_the_grid_at_the_resolution() -> None:
    settings = SearchSettings(low=1, high=64, resolution=0.05)
    loads = sweep_loads(settings)
    assert loads[0] == 1 and loads[-1] == 64
    assert all(b / a == pytest.approx(1.05) for a, b in pairwise(loads[:-1]))
    swept = linear_sweep(threshold(20), settings)
    searched = search(threshold(20), settings)
    assert swept.capacity <= 20 and swept.capacity >= 20 * 0.95
    assert len(swept.probes) >= 3 * len(searched.probes)
    integer = sweep_loads(SearchSettings(low=1, high=30, integer=True))
    assert integer == [float(i) for i in range(1, 31)]


def test_the_verdict_names_what_failed() -> None:
    slo = SimpleNamespace(**{key: None for key in ("p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "p50_tpot_ms",
                             "p90_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p90_itl_ms", "p99_itl_ms",
                             "p50_e2el_ms", "p90_e2el_ms", "p99_e2el_ms")})  # fmt: skip
    slo.p99_ttft_ms, slo.p50_tpot_ms, slo.min_goodput = 500.0, 20.0, 0.9
    ok = {
        "p99_ttft_ms": 400.0,
        "p50_tpot_ms": 10.0,
        "num_prompts": 10,
        "request_goodput": 5.0,
        "duration": 2.0,
    }
    assert verdict_of(ok, slo) == Verdict(True, 0.9 / 1.0, ())
    slow = {**ok, "p99_ttft_ms": 800.0, "request_goodput": 4.0}
    verdict = verdict_of(slow, slo)
    assert not verdict.passed and verdict.ratio == pytest.approx(1.6)
    assert verdict.failed == ("p99_ttft_ms 800.0 > 500", "goodput 80.0% < 90%")
    errors = verdict_of({**ok, "failed": 1}, slo)
    assert errors.failed == ("1 of 10 requests failed",)
    missing = verdict_of({**ok, "p50_tpot_ms": None}, slo)
    assert missing.failed == ("p50_tpot_ms not measured",)
    stopped = verdict_of({**ok, "failed": 3}, slo, "over capacity: ...")
    assert (stopped.passed, stopped.ratio, stopped.failed) == (
        False,
        None,
        ("stopped early: over capacity: ...",),
    )


def simulate_open_loop(rate: float, service_rate: float, rule: OverloadRule, seconds: float = 6.0):
    """An open loop at `rate` against a server finishing `service_rate` requests/s (a fluid queue with a
    0.1 s latency), progress reported every 0.1 s and the stop asked every 0.05 s, as the load generator
    does. The time it was stopped at (None: not stopped) and the watch."""
    count = int(rate * seconds)
    arrivals = [(i + 1) / rate for i in range(count)]
    watch = OverloadWatch(rule, t0=100.0, arrivals=arrivals)
    t = 0.0
    while t < seconds:
        t = round(t + 0.05, 6)
        arrived = sum(1 for a in arrivals if a <= t - 0.1)
        done = min(arrived, int(service_rate * max(0.0, t - 0.1)))
        if round(t * 20) % 2 == 0:
            watch.completed(done, ttft_s=None)
        if watch.over_capacity(100.0 + t) is not None:
            return t, watch
    return None, watch


def test_the_backlog_rule_stops_an_overloaded_open_loop_and_spares_a_stable_one() -> None:
    rule = OverloadRule()
    stopped_at, watch = simulate_open_loop(rate=60, service_rate=30, rule=rule)
    assert stopped_at is not None and stopped_at < 2.0
    assert "requests in flight grew" in watch.reason
    for rate in (10, 29, 30):
        assert simulate_open_loop(rate=rate, service_rate=30, rule=rule)[0] is None
    # 10 % over capacity: the backlog grows by 3 a second; at 25 % of the arrivals it takes the whole probe
    # to be called, and a slight overload is left to the SLOs.
    assert simulate_open_loop(rate=33, service_rate=30, rule=rule)[0] is None


def test_the_ttft_rule_needs_successive_slow_first_tokens() -> None:
    rule = OverloadRule(ttft_limit_s=0.1, ttft_factor=3, ttft_successive=3)
    watch = OverloadWatch(rule, t0=0.0)  # closed loop: no arrivals, only the TTFT rule
    for done, ttft in enumerate([0.5, 0.5, 0.05, 0.5, 0.5], start=1):
        watch.completed(done, ttft)
        assert watch.over_capacity(1.0) is None  # the streak was broken by the fast one
    watch.completed(6, 0.31)
    assert "3 successive requests waited more than 3 x the TTFT limit (100 ms)" in watch.over_capacity(1.0)
    assert OverloadWatch(OverloadRule(ttft_limit_s=None), t0=0.0).over_capacity(5.0) is None
    untimed = OverloadWatch(OverloadRule(ttft_limit_s=None), t0=0.0)
    for done in range(1, 20):
        untimed.completed(done, 9.0)
    assert untimed.over_capacity(5.0) is None  # no TTFT SLO: TTFT alone stops nothing


def test_nothing_is_stopped_before_a_request_has_finished() -> None:
    rule = OverloadRule()
    watch = OverloadWatch(rule, t0=0.0, arrivals=[i / 100 for i in range(1, 1000)])
    assert all(watch.over_capacity(t / 10) is None for t in range(1, 50))  # nothing finished
