"""Regressions between two results directories: what pairs with what, and the relative deltas."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from llmstack.report.rows import COMPARED


@dataclass
class Pairing:
    pairs: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)  # job, old, new
    unpaired: list[str] = field(default_factory=list)  # one line each: what could not be compared, and why


def pair_rows(baseline: list[dict[str, Any]], new: list[dict[str, Any]]) -> Pairing:
    """Jobs paired by name, else by the settings that varied in their grids, else (one job on each side:
    two single runs) with each other; then their levels by label."""
    old_jobs, new_jobs = _by_job(baseline), _by_job(new)
    matched: dict[str, str] = {name: name for name in new_jobs if name in old_jobs}
    rest_old = [j for j in old_jobs if j not in matched.values()]
    rest_new = [j for j in new_jobs if j not in matched]
    if len(old_jobs) == 1 and len(new_jobs) == 1 and rest_new:
        matched[rest_new[0]] = rest_old[0]
    else:
        matched.update(_by_settings(rest_old, rest_new, old_jobs, new_jobs))
    result = Pairing()
    for job in old_jobs:
        if job not in matched.values():
            result.unpaired.append(f"job {job}: only in the baseline")
    for job, rows in new_jobs.items():
        if job not in matched:
            result.unpaired.append(f"job {job}: only in the new results")
            continue
        old_levels = {r.get("level"): r for r in old_jobs[matched[job]]}
        label = job if job == matched[job] else f"{job} (vs {matched[job]})"
        for row in rows:
            old = old_levels.pop(row.get("level"), None)
            if old is None:
                result.unpaired.append(f"{job} level {row.get('level')}: not in the baseline")
            elif row.get("status") != "ok" or old.get("status") != "ok":
                bad = "new" if row.get("status") != "ok" else "baseline"
                result.unpaired.append(f"{job} level {row.get('level')}: the {bad} run did not succeed")
            else:
                result.pairs.append((label, old, row))
        for level in old_levels:
            result.unpaired.append(f"{matched[job]} level {level}: only in the baseline")
    return result


def compare(baseline: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paired levels, with the relative change of each compared metric (new vs baseline)."""
    deltas = []
    for job, old, row in pair_rows(baseline, new).pairs:
        delta: dict[str, Any] = {"job": job, "level": row.get("level")}
        for key in COMPARED:
            before, after = old.get(key), row.get(key)
            if isinstance(before, int | float) and isinstance(after, int | float) and before:
                delta[key] = (after - before) / before
        deltas.append(delta)
    return deltas


def compare_markdown(deltas: list[dict[str, Any]], unpaired: list[str] | None = None) -> str:
    keys = list(COMPARED)
    lines = [
        "| job | level | " + " | ".join(f"{k} ({COMPARED[k]} is better)" for k in keys) + " |",
        "|" + "---|" * (len(keys) + 2),
    ]
    for d in deltas:
        cells = [f"{d[k]:+.1%}" if k in d else "-" for k in keys]
        lines.append(f"| {d['job']} | {d['level']} | " + " | ".join(cells) + " |")
    if unpaired:
        lines += ["", "Not compared:", *(f"- {line}" for line in unpaired)]
    return "\n".join(lines) + "\n"


def _by_job(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    jobs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        jobs[str(row["job"])].append(row)
    return dict(jobs)


def _by_settings(
    old: list[str],
    new: list[str],
    old_jobs: dict[str, list[dict[str, Any]]],
    new_jobs: dict[str, list[dict[str, Any]]],
) -> dict[str, str]:
    """new job -> baseline job, where the settings that varied (in either grid) are the same on both."""
    old_settings = {j: _settings(old_jobs[j]) for j in old}
    new_settings = {j: _settings(new_jobs[j]) for j in new}
    if any(s is None for s in (*old_settings.values(), *new_settings.values())):
        return {}
    varied = _varied(list(old_settings.values()), list(new_settings.values()))  # type: ignore[arg-type]
    if not varied:
        return {}

    def key(settings: dict[str, str]) -> tuple[str, ...]:
        return tuple(f"{k}={settings.get(k, '(default)')}" for k in varied)

    old_keys: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for job, settings in old_settings.items():
        old_keys[key(settings)].append(job)  # type: ignore[arg-type]
    pairs = {}
    for job, settings in new_settings.items():
        candidates = old_keys.get(key(settings), [])  # type: ignore[arg-type]
        if len(candidates) == 1:
            pairs[job] = candidates[0]
    return pairs


def _settings(rows: list[dict[str, Any]]) -> dict[str, str] | None:
    overrides = rows[0].get("_overrides")
    if overrides is None:
        return None
    return {o.partition("=")[0].lstrip("+~"): o.partition("=")[2] for o in overrides}


def _varied(old: list[dict[str, str]], new: list[dict[str, str]]) -> list[str]:
    """The grids' coordinates: keys that vary within one side. A key fixed on each side (engine=a in one,
    engine=b in the other) is what is being compared, not a coordinate."""
    from llmstack.grid import NOT_IDENTITY

    def varying(side: list[dict[str, str]]) -> set[str]:
        keys = {k for s in side for k in s}
        return {k for k in keys if len({s.get(k) for s in side}) > 1}

    return sorted((varying(old) | varying(new)) - NOT_IDENTITY)
