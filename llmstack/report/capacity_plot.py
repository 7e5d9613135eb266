"""pareto.png of a capacity search: every load probe of every job, output tokens/s per user against output
tokens/s per device, one colour per setting; probes that met the SLOs filled, the others hollow; the line
through the passing probes that no other passing probe beats on both axes (the Pareto front).

Per user: 1000 / mean TPOT (ms), the decode speed one request sees (its tokens after the first); where a
probe has no TPOT, its output tokens/s over its mean requests in flight. Per device: the probe's output
tokens/s over the devices its job uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.report.rows import read_json

if TYPE_CHECKING:
    from llmstack.report.capacity_data import Search


def points(search: Search) -> list[dict[str, Any]]:
    """One point per probe: its job's setting, per user, per device, whether it passed, its load."""
    out = []
    for job in search.jobs:
        for probe in job.search.get("probes", []):
            result = read_json(search.directory / job.name / f"bench-{probe['label']}" / "result.json") or {}
            tokens = probe.get("output_throughput", result.get("output_throughput"))
            tpot = result.get("mean_tpot_ms")
            in_flight = probe.get("mean_in_flight")
            if isinstance(tpot, int | float) and tpot > 0:
                per_user = 1000.0 / tpot
            elif isinstance(tokens, int | float) and isinstance(in_flight, int | float) and in_flight > 0:
                per_user = tokens / in_flight
            else:
                continue
            if not isinstance(tokens, int | float):
                continue
            out.append({"setting": search.setting_text(job), "per_user": per_user,
                        "per_device": tokens / job.devices, "passed": bool(probe.get("passed")),
                        "load": probe.get("load")})  # fmt: skip
    return out


def front(passing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both axes, by per device ascending."""
    kept = [
        p
        for p in passing
        if not any(
            q["per_user"] >= p["per_user"]
            and q["per_device"] >= p["per_device"]
            and (q["per_user"], q["per_device"]) != (p["per_user"], p["per_device"])
            for q in passing
        )
    ]
    return sorted(kept, key=lambda p: p["per_device"])


def pareto(search: Search) -> list[Path]:
    """pareto.png in the grid's directory; the paths written (none without a probe to plot)."""
    found = points(search)
    if not found:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, setting in enumerate(dict.fromkeys(p["setting"] for p in found)):
        colour = colours[index % len(colours)]
        for passed in (True, False):
            mine = [p for p in found if p["setting"] == setting and p["passed"] is passed]
            if mine:
                ax.scatter([p["per_device"] for p in mine], [p["per_user"] for p in mine], marker="o",
                           color=colour if passed else "none", edgecolors=colour, zorder=3,
                           label=setting + ("" if passed else " (failed the SLOs)"))  # fmt: skip
    line = front([p for p in found if p["passed"]])
    if line:
        ax.plot([p["per_device"] for p in line], [p["per_user"] for p in line], color="black",
                linestyle="--", linewidth=1, marker="D", markersize=9, markerfacecolor="none", zorder=4,
                label="Pareto front (passing probes)")  # fmt: skip
    ax.set_xlabel("output tokens/s per device")
    ax.set_ylabel("output tokens/s per user (1000 / mean TPOT)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = search.directory / "pareto.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
