"""A capacity search's jobs as its grid directory holds them (grid.json's `search`, `pruned` and `devices`,
each job's summary.json and failure.json), and what the report and the profile both say of them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmstack.report.rows import grid_jobs, read_json

UNITS = {"concurrency": "requests in flight", "request_rate": "requests/s"}
LOOPS = {
    "concurrency": "closed loop, benchmark.concurrency",
    "request_rate": "open loop, benchmark.request_rate",
}
# Not settings of the server: never a column of the table nor a value of the profile.
_NOT_SETTINGS = ("benchmark.", "hydra.", "results_dir", "experiment_name", "rerun", "dry_run")


@dataclass
class SearchJob:
    name: str
    overrides: list[str]
    devices: int
    status: str  # ok | failed | pruned | not run
    reason: str = ""  # why pruned or failed
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def search(self) -> dict[str, Any]:
        return (self.summary.get("benchmark") or {}).get("search") or {}

    @property
    def capacity(self) -> float | None:
        value = (self.summary.get("benchmark") or {}).get("capacity")
        return float(value) if isinstance(value, int | float) and self.status == "ok" else None

    @property
    def per_device(self) -> float | None:
        return None if self.capacity is None else self.capacity / self.devices

    @property
    def tokens_per_device(self) -> float | None:
        """Output tokens/s per device at the capacity."""
        value = self.search.get("output_throughput")
        return value / self.devices if isinstance(value, int | float) and self.capacity is not None else None

    def settings(self) -> dict[str, str]:
        return {o.partition("=")[0].lstrip("+~"): o.partition("=")[2] for o in self.overrides}


@dataclass
class Search:
    directory: Path
    jobs: list[SearchJob]
    varied: list[str]  # the settings that differ between jobs (load keys and bookkeeping aside)

    @property
    def ranked(self) -> list[SearchJob]:
        """The jobs that found a capacity, best first (per device, then output tokens/s per device)."""
        found = [j for j in self.jobs if j.per_device is not None]
        return sorted(found, key=lambda j: (-(j.per_device or 0), -(j.tokens_per_device or 0)))

    @property
    def best(self) -> SearchJob | None:
        return next(iter(self.ranked), None)

    @property
    def pruned(self) -> list[SearchJob]:
        return [j for j in self.jobs if j.status == "pruned"]

    @property
    def load(self) -> str:
        return next((str(j.search["load"]) for j in self.jobs if j.search.get("load")), "request_rate")

    @property
    def probe_count(self) -> int:
        return sum(int(j.search.get("probe_count") or 0) for j in self.jobs)

    def setting_text(self, job: SearchJob) -> str:
        settings = job.settings()
        return ", ".join(f"{k}={settings.get(k, '(default)')}" for k in self.varied) or job.name


def load_search(experiment_dir: Path, names: list[str] | None = None) -> Search | None:
    """The search this grid directory holds, or None when it is not a capacity search."""
    listing = read_json(experiment_dir / "grid.json") or {}
    if listing.get("search") != "capacity":
        return None
    overrides = grid_jobs(experiment_dir) or {}
    devices = {j["name"]: j.get("devices") or 1 for j in listing.get("jobs", [])}
    pruned: dict[str, str] = listing.get("pruned") or {}
    jobs = []
    for name in names if names is not None else list(overrides):
        job = SearchJob(name, overrides.get(name, []), int(devices.get(name, 1)), "not run")
        if name in pruned:
            job.status, job.reason = "pruned", pruned[name]
        else:
            failure = read_json(experiment_dir / name / "failure.json")
            job.summary = read_json(experiment_dir / name / "summary.json") or {}
            if failure is not None and failure.get("phase") == "validate" and \
                    failure.get("error_type") == "ConfigError":  # fmt: skip
                job.status, job.reason = "pruned", f"at its start: {failure.get('error', '')}"
            elif failure is not None:
                job.status, job.reason = "failed", str(failure.get("error", ""))
            elif job.summary.get("status") == "ok":
                job.status = "ok"
            elif job.summary:
                job.status, job.reason = str(job.summary.get("status")), str(job.summary.get("error", ""))
        jobs.append(job)
    varied = [k for k in listing.get("varied", []) if not k.startswith(_NOT_SETTINGS)]
    return Search(experiment_dir, jobs, varied)


def slo_text(search: Search) -> str:
    job = search.best or next((j for j in search.jobs if j.search), None)
    texts = job.search.get("slo", []) if job is not None else []
    return "; ".join(texts) or "(none recorded)"


def serve_command(search: Search) -> str:
    model = (search.best.summary.get("model") if search.best else None) or "..."
    return f"python -m llmstack --config-dir {search.directory} profile=best model={model}"


def num(value: float | None) -> str:
    """4 significant digits; whole numbers from 10 000 up (17180, not 1.718e+04)."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
