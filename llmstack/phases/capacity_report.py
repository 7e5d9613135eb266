"""What the capacity phase leaves in the run directory besides its probes' levels: summary.json's `search`
record, summary.md (the capacity, the SLOs, the settings and the probe count in its first lines, then every
probe) and capacity.png (load vs each SLO'd metric, the SLO lines and the boundary found).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from llmstack.phases.capacity_search import SearchResult, percentile_slos

# `phase` below is the capacity phase (llmstack.phases.capacity.CapacityPhase), named by Any: that module
# imports this one.
CapacityPhase = Any

logger = logging.getLogger(__name__)

_OUTCOMES = {
    "found": "found",
    "at_least": "at least (the top of the range passed)",
    "below_range": "below the range (its lowest load failed)",
    "unresolved": "not resolved within benchmark.max_probes",
}


def search_record(phase: CapacityPhase, result: SearchResult) -> dict[str, Any]:
    """summary.json's `benchmark.search`: the outcome, the figures at the capacity, settings, probes."""
    at = _at_capacity(phase, result)
    return {
        "outcome": result.outcome,
        "load": phase.bench.load,
        "capacity": result.capacity,
        "failed_above": result.failed_above,
        "confirmed": result.confirmed,
        "request_throughput": at.get("request_throughput"),
        "output_throughput": at.get("output_throughput"),
        "mean_in_flight": at.get("mean_in_flight"),
        "max_in_flight": at.get("max_in_flight"),
        "slo": _slo_texts(phase),
        "settings": _settings(phase),
        "probe_count": len(phase.probes),
        "probes_by_role": dict(Counter(p["role"] for p in phase.probes)),
        "probes": phase.probes,
    }


def _at_capacity(phase: CapacityPhase, result: SearchResult) -> dict[str, Any]:
    """The last passing probe at the capacity (the confirm probe when it ran)."""
    for probe in reversed(phase.probes):
        if probe["passed"] and probe["load"] == result.capacity:
            return probe
    return {}


def _slo_texts(phase: CapacityPhase) -> list[str]:
    from llmstack.phases.runner import goodput_slos

    slo = phase.bench.slo
    texts = [f"{key} <= {limit:g}" for key, limit in percentile_slos(slo).items()]
    if slo.min_goodput is not None:
        per_request = ", ".join(f"{k} <= {v:g} ms" for k, v in goodput_slos(phase.bench).items())
        texts.append(f"goodput >= {slo.min_goodput:.0%} of requests ({per_request})")
    return texts


def _settings(phase: CapacityPhase) -> dict[str, Any]:
    b, s = phase.bench, phase.settings
    per_probe = f"{b.duration_s:g} s" if b.duration_s is not None else f"{b.num_prompts} requests"
    if b.duration_s is None and not phase.open_loop:
        per_probe += " (at least 4 per client)"
    return {
        "range": [s.low, s.high], "growth": s.growth, "resolution": s.resolution, "method": s.method,
        "per_probe": per_probe, "probe_warmup_requests": b.probe_warmup_requests,
        "burstiness": b.burstiness if phase.open_loop else None, "max_concurrency": b.max_concurrency,
        "input_len": b.input_len, "output_len": b.output_len, "dataset": b.dataset,
        "stop_early": b.stop_early,
    }  # fmt: skip


def headline(phase: CapacityPhase, result: SearchResult) -> list[str]:
    """summary.md's first lines."""
    unit = "requests/s (open loop, benchmark.request_rate)" if phase.open_loop else \
        "requests in flight (closed loop, benchmark.concurrency)"  # fmt: skip
    record = search_record(phase, result)
    value = "none" if result.capacity is None else f"{result.capacity:.4g}"
    lines = [f"# Capacity: {value} {unit}: {_OUTCOMES[result.outcome]}", ""]
    lines.append("Under the SLOs " + "; ".join(record["slo"]) + " (latencies in ms; no request may fail).")
    s = record["settings"]
    lines.append(
        f"Settings: range [{s['range'][0]:g}, {s['range'][1]:g}], growth {s['growth']:g}, resolution "
        f"{s['resolution']:.0%}, method {s['method']}, {s['per_probe']} per probe after "
        f"{s['probe_warmup_requests']} warm-up requests, prompts {s['input_len']} + {s['output_len']} tokens "
        f"({s['dataset']})."
    )
    roles = ", ".join(f"{n} {role}" for role, n in record["probes_by_role"].items())
    stopped = sum(p["stopped_early"] is not None for p in phase.probes)
    lines.append(
        f"Probes: {record['probe_count']} ({roles}); {stopped} stopped early as plainly over capacity."
    )
    if record["request_throughput"] is not None:
        confirm = {True: "passed", False: "failed", None: "not run"}[result.confirmed]
        lines.append(
            f"At the capacity: {record['request_throughput']:.3g} requests/s, "
            f"{record['output_throughput']:.4g} output tokens/s, "
            f"{_fmt(record['mean_in_flight'])} requests in flight on average "
            f"(peak {record['max_in_flight']}); the confirm probe {confirm}."
        )
    if result.failed_above is not None:
        lines.append(f"The lowest failing load: {result.failed_above:.4g}.")
    return lines


def write_report(phase: CapacityPhase, result: SearchResult) -> None:
    """summary.md and capacity.png in the run directory; the headline printed."""
    lines = headline(phase, result)
    keys = list(percentile_slos(phase.bench.slo))
    shown = ["label", "role", "load", "passed", *keys, "goodput_fraction", "request_throughput",
             "output_throughput", "mean_in_flight", "failed"]  # fmt: skip
    table = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for probe in phase.probes:
        table.append("| " + " | ".join(_fmt(probe.get(k)) for k in shown) + " |")
    text = "\n".join([*lines, "", "## Probes", "", *table]) + "\n"
    phase.ctx.rundir.write_text("summary.md", text)
    print("\n".join(lines), flush=True)
    try:
        plot(phase, result, keys)
    except ImportError as exc:  # matplotlib is optional: the numbers are all in summary.json
        logger.warning("capacity.png not drawn: %s", exc)


def plot(phase: CapacityPhase, result: SearchResult, keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    limits = percentile_slos(phase.bench.slo)
    if phase.bench.slo.min_goodput is not None:
        keys, limits = (
            [*keys, "goodput_fraction"],
            {**limits, "goodput_fraction": phase.bench.slo.min_goodput},
        )
    if not keys:
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        for passed, colour, name in ((True, "tab:green", "pass"), (False, "tab:red", "fail")):
            points = [
                (p["load"], p[key]) for p in phase.probes if p["passed"] is passed and p.get(key) is not None
            ]
            if points:
                ax.scatter(*zip(*points, strict=True), color=colour, label=name, zorder=3)
        ax.axhline(limits[key], color="black", linestyle="--", label=f"SLO {limits[key]:g}")
        if result.capacity is not None:
            ax.axvline(result.capacity, color="tab:blue", label=f"capacity {result.capacity:.4g}")
        ax.set_ylabel(key)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("request rate (req/s)" if phase.open_loop else "concurrency (requests in flight)")
    fig.tight_layout()
    fig.savefig(phase.ctx.rundir.file("capacity.png"), dpi=100)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "; ".join(map(str, value)).replace("|", "/") or "-"
    return str(value)
