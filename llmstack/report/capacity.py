"""A server-settings search's report: a grid whose every job is `benchmark=capacity` (grid.json's `search`).

summary.md says in its first lines the best capacity found, under which SLOs, with which settings, and how
many jobs and probes it took and how many settings were pruned (refused by validation before the search,
never launched); then the capacity table, one row per setting (settings, capacity, per device, probes,
outcome), best first. The objective is capacity per device: the capacity (requests/s open loop, requests in
flight closed loop) over the devices the job's engine uses (EngineConfig.devices_needed(), in grid.json).
pareto.png (llmstack.report.capacity_plot) puts every probe of every job on output tokens/s per user against
output tokens/s per device; profile/best.yaml (llmstack.report.capacity_profile) is the best setting as a
profile, served with `python -m llmstack --config-dir <grid> profile=best model=...`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from llmstack.report.capacity_data import LOOPS, UNITS, Search, load_search, num, serve_command, slo_text
from llmstack.report.rows import _cell

__all__ = ["announce", "headline", "load_search", "markdown", "write"]


_ORDER = {"ok": 0, "failed": 1}


def headline(search: Search) -> list[str]:
    """summary.md's first lines: the capacity, the SLOs, the settings, the jobs and probes it took."""
    unit, best = UNITS[search.load], search.best
    ran = [j for j in search.jobs if j.status != "pruned"]
    statuses = [j.status for j in ran]
    counts = ", ".join(
        f"{statuses.count(s)} {s}" for s in dict.fromkeys(sorted(statuses, key=lambda s: _ORDER.get(s, 2)))
    )
    title = f"# Capacity search {search.directory.name}"
    if best is None:
        lines = [f"{title}: no setting met the SLOs ({LOOPS[search.load]})", ""]
    else:
        # The top of the range passed: the capacity is a lower bound (benchmark.<load>'s highest).
        bound = "at least " if best.search.get("outcome") == "at_least" else ""
        lines = [
            f"{title}: {bound}{num(best.per_device)} {unit} per device with {search.setting_text(best)} "
            f"({LOOPS[search.load]})",
            "",
        ]
    lines.append(f"Under the SLOs {slo_text(search)} (latencies in ms; no request may fail).")
    if best is not None:
        summary = best.summary
        tokens = (
            f"; {num(best.tokens_per_device)} output tokens/s per device there"
            if best.tokens_per_device
            else ""
        )
        what = ", ".join(f"{k} {summary.get(k)}" for k in ("model", "engine", "low_bit", "device"))
        lines.append(
            f"Best setting: {search.setting_text(best)}: capacity {num(best.capacity)} {unit} on "
            f"{best.devices} device(s){tokens} ({what}; outcome {best.search.get('outcome')})."
        )
        lines.append(
            f"Profile: {search.directory / 'profile' / 'best.yaml'}; serve with it: {serve_command(search)}"
        )
    lines.append(
        f"Took {len(ran)} jobs ({counts or 'none'}) and {search.probe_count} probes; {len(search.pruned)} of "
        f"{len(search.jobs)} settings pruned (refused by validation, never launched)."
    )
    return lines


def markdown(search: Search) -> str:
    """summary.md: the headline, the capacity table (best first), the pruned settings with their reasons."""
    unit = UNITS[search.load]
    shown = [*search.varied] or ["job"]
    header = [*shown, "status", f"capacity ({unit})", "devices", "per device", "output tok/s per device",
              "probes", "outcome", "reason"]  # fmt: skip
    lines = [*headline(search), "", "## Capacity per setting", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]  # fmt: skip
    ranked = search.ranked
    for job in [*ranked, *(j for j in search.jobs if j not in ranked)]:
        settings = job.settings()
        cells = [settings.get(k, "(default)") for k in search.varied] or [job.name]
        probes, outcome = (job.search.get("probe_count", "-"), job.search.get("outcome", "-")) if job.search \
            else ("-", "-")  # fmt: skip
        cells += [job.status, num(job.capacity), str(job.devices), num(job.per_device),
                  num(job.tokens_per_device), str(probes), str(outcome), _reason(job.reason)]  # fmt: skip
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "Every probe of every job: summary.csv and each job's summary.md; pareto.png."]
    return "\n".join(lines) + "\n"


def write(search: Search) -> list[Path]:
    """summary.md (replacing the per-probe table), pareto.png, profile/best.yaml; the paths written."""
    from llmstack.report.capacity_plot import pareto
    from llmstack.report.capacity_profile import write_profile
    from llmstack.results.files import write_text_atomic

    written = [write_text_atomic(search.directory / "summary.md", markdown(search))]
    with contextlib.suppress(ImportError):  # matplotlib is optional: the numbers are in the table
        written += pareto(search)
    if search.best is not None:
        written.append(write_profile(search))
    return written


def announce(directory: Path) -> None:
    """After the grid: the headline on stderr, where the grid's other lines go."""
    search = load_search(directory)
    if search is not None:
        print("llmstack: " + "\nllmstack: ".join(line for line in headline(search) if line), file=sys.stderr)


def _reason(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:200] + ("..." if len(first) > 200 else "")
