"""The rows of a report: one per job and load level, read from what the runs wrote."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

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


def collect_rows(experiment_dir: Path, jobs: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per job and load level (a failed job keeps the levels it measured, a level cut short says
    so in `complete`); one row for a failed job that measured none. A grid's rows are its jobs' (grid.json,
    or `jobs`), each with its `_overrides`; a single run's are its own levels."""
    if is_single_run(experiment_dir):
        return _job_rows(experiment_dir, None)
    listed = grid_jobs(experiment_dir)
    if jobs is None and listed is not None:
        jobs = list(listed)
    if jobs is None:
        jobs = [p.name for p in experiment_dir.iterdir() if p.is_dir()]
    names = sorted(jobs)
    rows: list[dict[str, Any]] = []
    for name in names:
        rows += _job_rows(experiment_dir / name, (listed or {}).get(name))
    return rows


def is_single_run(path: Path) -> bool:
    """A run's own directory (its summary.json at the top), not a directory of runs or jobs."""
    return (path / "summary.json").is_file() and not (path / "grid.json").is_file()


def grid_jobs(experiment_dir: Path) -> dict[str, list[str]] | None:
    """The grid's job names and their overrides (grid.json, written when the grid started), or None."""
    listing = read_json(experiment_dir / "grid.json")
    if listing is None:
        return None
    return {job["name"]: list(job.get("overrides", [])) for job in listing.get("jobs", [])}


def _job_rows(job_dir: Path, overrides: list[str] | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if job_dir.is_dir():
        failure = read_json(job_dir / "failure.json")
        summary = read_json(job_dir / "summary.json")
        bench = (summary or {}).get("benchmark") or {}
        levels = bench.get("levels") or []
        if failure is not None and not levels:
            rows.append({"job": job_dir.name, "status": "failed", "error": failure.get("error", "")[:300]})
            return _with_overrides(rows, overrides)
        if summary is None:
            return rows
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
            return _with_overrides(rows, overrides)
        if not levels:
            rows.append({**base, "error": summary.get("error", "")})
        for level in levels:
            label = str(level.get("label"))
            result = read_json(job_dir / f"bench-{label}" / "result.json") or {}
            row = {**base, "level": label, "complete": _completeness(level, result)}
            for key in COLUMNS:
                if key not in row:
                    value = level.get(key, result.get(key))
                    if value is not None:
                        row[key] = value
            if "concurrency" not in row and result.get("max_concurrency") is not None:
                row["concurrency"] = result["max_concurrency"]
            rows.append(row)
    return _with_overrides(rows, overrides)


def _with_overrides(rows: list[dict[str, Any]], overrides: list[str] | None) -> list[dict[str, Any]]:
    if overrides is not None:
        for row in rows:
            row["_overrides"] = overrides
    return rows


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


def load_of(row: dict[str, Any]) -> tuple[str, float] | None:
    """What the row's level loaded the server with: ("request_rate", req/s) for an open-loop level with a
    finite rate, else ("concurrency", streams); None when neither is a number."""
    for key in ("request_rate", "concurrency"):
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and not math.isinf(value):
            return key, float(value)
    return None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "/").replace("\n", " ")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
