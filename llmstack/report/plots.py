"""Throughput, TTFT and TPOT against load: one line per job setting that varied, labelled by it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.report.rows import load_of

# Their values are the x axis (the load), not a line of their own.
LOAD_KEYS = ("benchmark.concurrency", "benchmark.request_rate")
_AXIS_NAMES = {"concurrency": "concurrency (concurrent requests)", "request_rate": "request rate (req/s)"}


@dataclass
class Layout:
    xlabel: str
    series: dict[str, list[dict[str, Any]]]  # line label -> its points (rows with "_x"), sorted by load


def layout(rows: list[dict[str, Any]]) -> Layout | None:
    """Which lines the charts draw and what their x axis is, from the ok rows that have a load."""
    points = [(row, load) for row in rows if row.get("status") == "ok" and (load := load_of(row))]
    if not points:
        return None
    kinds = sorted({kind for _, (kind, _) in points})
    xlabel = " or ".join(_AXIS_NAMES[k] for k in kinds)
    varied = _varied_keys([row for row, _ in points])
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row, (kind, x) in points:
        label = _label(row, varied)
        if len(kinds) > 1:
            label = f"{label} ({kind})" if label else kind
        series[label].append({**row, "_x": x})
    xs = [line[0]["_x"] for line in series.values()]
    if len(series) > 1 and all(len(p) == 1 for p in series.values()) and len(set(xs)) == len(xs):
        # Linked axes (one job per load level, e.g. max_num_seqs with as many streams): one line through
        # every job, named by what varied along it.
        name = ", ".join(varied) if varied else "jobs"
        series = {f"{name} (one job per point)": [p for line in series.values() for p in line]}
    for line in series.values():
        line.sort(key=lambda r: r["_x"])
    return Layout(xlabel, dict(sorted(series.items())))


def _varied_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys (load keys aside) whose values differ between the jobs of these rows."""
    values: dict[str, set[str]] = defaultdict(set)
    jobs = {row["job"]: row.get("_overrides") for row in rows}
    if any(overrides is None for overrides in jobs.values()):
        return []
    for overrides in jobs.values():
        present = {}
        for override in overrides:
            key, _, value = override.partition("=")
            present[key.lstrip("+~")] = value
        for key in {k for o in jobs.values() for k in _keys(o)}:
            values[key].add(present.get(key, "(default)"))
    return sorted(k for k, seen in values.items() if len(seen) > 1 and k not in LOAD_KEYS)


def _label(row: dict[str, Any], varied: list[str]) -> str:
    overrides = row.get("_overrides")
    if overrides is None:
        # No job list (a directory of single runs, or an older grid): each job is its own line.
        return str(row["job"])
    settings = {o.partition("=")[0].lstrip("+~"): o.partition("=")[2] for o in overrides}
    return ", ".join(f"{key}={settings.get(key, '(default)')}" for key in varied)


def _keys(overrides: list[str]) -> set[str]:
    return {o.partition("=")[0].lstrip("+~") for o in overrides}


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """throughput.png, ttft.png, tpot.png in out_dir; the paths written (none without a plottable row)."""
    chart = layout(rows)
    if chart is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = {
        "throughput.png": ("output tokens/s", [("output_throughput", "")]),
        "ttft.png": ("TTFT (ms)", [("median_ttft_ms", " p50"), ("p99_ttft_ms", " p99")]),
        "tpot.png": ("TPOT (ms)", [("median_tpot_ms", " p50"), ("p99_tpot_ms", " p99")]),
    }
    written = []
    for name, (ylabel, metrics) in charts.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, line in chart.series.items():
            for key, suffix in metrics:
                xs = [p["_x"] for p in line if p.get(key) is not None]
                ys = [p[key] for p in line if p.get(key) is not None]
                if xs:
                    ax.plot(xs, ys, marker="o", label=(label or "all jobs") + suffix)
        ax.set_xlabel(chart.xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
