"""Tables and plots across the jobs of an experiment, and regressions between two of them.

    python -m llmstack.report results/<experiment>                       # summary.csv, summary.md, *.png
    python -m llmstack.report results/<baseline> --compare results/<new>  # relative deltas, new vs baseline

Reads what runs wrote: each job's summary.json (or failure.json) and its bench-<level>/result.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from llmstack.results.files import write_text_atomic

logger = logging.getLogger(__name__)

COLUMNS = (
    "job", "status", "engine", "model", "low_bit", "device", "level", "complete", "concurrency",
    "request_rate", "completed", "failed", "request_throughput", "output_throughput",
    "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
    "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "error",
)  # fmt: skip
# Metrics compared between two experiments, and which direction is better.
COMPARED = {
    "request_throughput": "higher",
    "output_throughput": "higher",
    "mean_ttft_ms": "lower",
    "p99_ttft_ms": "lower",
    "mean_tpot_ms": "lower",
    "p99_tpot_ms": "lower",
}


def collect_rows(experiment_dir: Path) -> list[dict[str, Any]]:
    """One row per job and load level (a failed job keeps the levels it measured, a level cut short says
    so in `complete`); one row for a failed job that measured none."""
    rows: list[dict[str, Any]] = []
    for job_dir in sorted(p for p in experiment_dir.iterdir() if p.is_dir()):
        failure = _read_json(job_dir / "failure.json")
        summary = _read_json(job_dir / "summary.json")
        bench = (summary or {}).get("benchmark") or {}
        levels = bench.get("levels") or []
        if failure is not None and not levels:
            rows.append({"job": job_dir.name, "status": "failed", "error": failure.get("error", "")[:300]})
            continue
        if summary is None:
            continue
        base = {
            "job": job_dir.name,
            "status": "failed" if failure is not None else summary.get("status"),
            **{k: summary.get(k) for k in ("engine", "model", "low_bit", "device")},
        }
        if failure is not None:
            base["error"] = failure.get("error", "")[:300]
        offline = bench.get("result")
        if offline and not levels:  # offline_throughput: one figure set, no load levels
            rows.append({**base, "level": "offline", **_offline_row(offline)})
            continue
        if not levels:
            rows.append({**base, "error": summary.get("error", "")})
        for level in levels:
            label = str(level.get("label"))
            result = _read_json(job_dir / f"bench-{label}" / "result.json") or {}
            row = {**base, "level": label, "complete": _completeness(level, result)}
            for key in COLUMNS:
                if key not in row:
                    value = level.get(key, result.get(key))
                    if value is not None:
                        row[key] = value
            if "concurrency" not in row and result.get("max_concurrency") is not None:
                row["concurrency"] = result["max_concurrency"]
            rows.append(row)
    return rows


def build_report(experiment_dir: Path) -> list[Path]:
    """Write summary.csv, summary.md and the plots into the experiment directory; the paths written."""
    rows = collect_rows(experiment_dir)
    written = [
        write_text_atomic(experiment_dir / "summary.csv", to_csv(rows)),
        write_text_atomic(experiment_dir / "summary.md", to_markdown(rows, f"# {experiment_dir.name}\n\n")),
    ]
    written += plot(rows, experiment_dir)
    return written


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]], title: str = "") -> str:
    shown = ("job", "status", "level", "complete", "completed", "failed", "request_throughput",
             "output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
             "error")  # fmt: skip
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key in shown) + " |")
    return title + "\n".join(lines) + "\n"


def compare(baseline: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows matched by (job, level), with the relative change of each compared metric (new vs baseline)."""
    index = {(r["job"], r.get("level")): r for r in baseline if r.get("status") == "ok"}
    deltas = []
    for row in new:
        old = index.get((row["job"], row.get("level")))
        if old is None or row.get("status") != "ok":
            continue
        delta: dict[str, Any] = {"job": row["job"], "level": row.get("level")}
        for key in COMPARED:
            before, after = old.get(key), row.get(key)
            if isinstance(before, int | float) and isinstance(after, int | float) and before:
                delta[key] = (after - before) / before
        deltas.append(delta)
    return deltas


def compare_markdown(deltas: list[dict[str, Any]]) -> str:
    keys = list(COMPARED)
    lines = [
        "| job | level | " + " | ".join(f"{k} ({COMPARED[k]} is better)" for k in keys) + " |",
        "|" + "---|" * (len(keys) + 2),
    ]
    for d in deltas:
        cells = [f"{d[k]:+.1%}" if k in d else "-" for k in keys]
        lines.append(f"| {d['job']} | {d['level']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Throughput, TTFT and TPOT against load, one line per engine/low_bit/model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        x = _load_of(row)
        if row.get("status") == "ok" and x is not None:
            series[f"{row.get('engine')}/{row.get('low_bit')}/{row.get('model')}"].append({**row, "_x": x})
    if not series:
        return []
    xlabel = "request rate (req/s)" if any(r.get("request_rate") for r in rows) else "concurrency"
    charts = {
        "throughput.png": ("output tokens/s", [("output_throughput", "")]),
        "ttft.png": ("TTFT (ms)", [("median_ttft_ms", " p50"), ("p99_ttft_ms", " p99")]),
        "tpot.png": ("TPOT (ms)", [("median_tpot_ms", " p50"), ("p99_tpot_ms", " p99")]),
    }
    written = []
    for name, (ylabel, metrics) in charts.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points in sorted(series.items()):
            points.sort(key=lambda r: r["_x"])
            for key, suffix in metrics:
                xs = [p["_x"] for p in points if p.get(key) is not None]
                ys = [p[key] for p in points if p.get(key) is not None]
                if xs:
                    ax.plot(xs, ys, marker="o", label=label + suffix)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmstack.report", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="results/<experiment> (the baseline with --compare)")
    parser.add_argument("--compare", type=Path, help="a second results directory, compared against the first")
    args = parser.parse_args(argv)
    if not args.experiment.is_dir():
        print(f"llmstack.report: {args.experiment} is not a directory", file=sys.stderr)
        return 2
    if args.compare is None:
        for path in build_report(args.experiment):
            print(path)
        print(to_markdown(collect_rows(args.experiment)))
        return 0
    if not args.compare.is_dir():
        print(f"llmstack.report: {args.compare} is not a directory", file=sys.stderr)
        return 2
    deltas = compare(collect_rows(args.experiment), collect_rows(args.compare))
    text = f"# {args.compare.name} vs {args.experiment.name}\n\n" + compare_markdown(deltas)
    write_text_atomic(args.compare / f"compare-{args.experiment.name}.md", text)
    print(text)
    return 0


def _offline_row(result: dict[str, Any]) -> dict[str, Any]:
    """vLLM's offline throughput keys under the column names the online levels use."""
    return {
        "completed": result.get("num_requests"),
        "request_throughput": result.get("requests_per_second"),
        "output_throughput": result.get("output_tokens_per_second"),
        "total_token_throughput": result.get("tokens_per_second"),
    }


def _completeness(level: dict[str, Any], result: dict[str, Any]) -> str:
    """ "yes", or "cut short: <why>" for a level stopped by a signal or a dead engine (older runs: yes)."""
    cut_short = level.get("cut_short", result.get("cut_short"))
    return "yes" if not cut_short else f"cut short: {cut_short}"


def _load_of(row: dict[str, Any]) -> float | None:
    for key in ("request_rate", "concurrency"):
        value = row.get(key)
        if isinstance(value, int | float) and not math.isinf(value):
            return float(value)
    return None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "/").replace("\n", " ")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
