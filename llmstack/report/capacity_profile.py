"""The best setting of a capacity search as a profile: <grid>/profile/best.yaml.

Like configs/profile/*.yaml it is `# @package _global_`, picks its groups with `override /<group>: <option>`
and gives every value with its source in a comment: a tuned value (one the grid varied) says which search
chose it, when, on which device, for which model, under which SLOs, with what capacity, and what the other
values it tried measured; a value every job ran with says so. Hydra finds it with the grid's directory on
its search path:

    python -m llmstack --config-dir <grid> profile=best model=<model>

(or copy it into configs/profile/<name>.yaml and use profile=<name>). Only server settings go in: the
engine's, the device's and the low_bit's keys and group choices, and the profile the jobs ran with (included
as `/profile/<name>@_here_`); never the benchmark, the model, ports or secrets.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from llmstack.report.rows import read_json

if TYPE_CHECKING:
    from llmstack.report.capacity_data import Search, SearchJob

GROUPS = ("engine", "device", "low_bit")
# Where a job listens is no setting to serve with (grids often pick free ports: engine.port=0).
_LEFT_OUT = ("engine.port", "engine.host", "engine.api_key")


def write_profile(search: Search) -> Path:
    from llmstack.results.files import write_text_atomic

    path = search.directory / "profile" / "best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, profile_text(search))


def profile_text(search: Search) -> str:
    from llmstack.config.secrets import is_secret_override
    from llmstack.report.capacity_data import LOOPS, UNITS, num, serve_command, slo_text

    best = search.best
    assert best is not None
    unit = UNITS[search.load]
    date = str(best.summary.get("started_at", ""))[:10] or "unknown date"
    device = device_text(search.directory / best.name)
    model = best.summary.get("model")
    where = f"{search.directory.name} ({search.directory})"
    provenance = (f"search {search.directory.name}, {date}, {device}, model={model}, SLOs "
                  f"{slo_text(search)}")  # fmt: skip
    lines = [
        "# @package _global_",
        f"# The best server setting of the capacity search {where}, written by llmstack.report:",
        f"# {num(best.per_device)} {unit} per device ({num(best.capacity)} on {best.devices} device(s), "
        f"{LOOPS[search.load]}) under the SLOs {slo_text(search)};",
        f"# model={model}, measured {date} on {device}; {len(search.jobs) - len(search.pruned)} jobs, "
        f"{search.probe_count} probes, {len(search.pruned)} settings pruned (refused by validation).",
        "# Values marked 'tuned' are the search's pick among those it tried; the others, what every job ran.",
        f"#   {serve_command(search)}",
        "# (or copy this file into configs/profile/<name>.yaml and use profile=<name>)",
    ]
    choices: list[str] = []
    tree: dict[str, Any] = {}
    for override in best.overrides:
        if is_secret_override(override) or override.startswith("~"):  # a deletion sets nothing to write
            continue
        raw_key, _, raw = override.partition("=")
        key = raw_key.lstrip("+~")
        if key in GROUPS:
            comment = _comment(search, best, key, provenance)
            choices.append(f"  - override /{key}: {raw}{comment}")
            continue
        if key == "profile" and raw not in ("null", ""):
            # The profile the jobs ran with, included first: this one's values go on top of its values.
            comment = _comment(search, best, key, provenance).replace(
                "as every job of the search ran", "the jobs'"
            )
            choices.insert(0, f"  - /profile/{raw}@_here_{comment}")
            continue
        if key.split(".")[0] not in GROUPS or key in _LEFT_OUT or key.endswith("_port"):
            continue
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = (_value(raw), _comment(search, best, key, provenance))
    if not any(choice.startswith("  - override /device:") for choice in choices):
        # device=auto picked it: the profile names the device its numbers were measured on.
        name = (_read_yaml(search.directory / best.name / "config.yaml").get("device") or {}).get("name")
        if name:
            choices.append(
                f"  - override /device: {name}  # the device the search ran on (device=auto found it)"
            )
    if choices:
        lines += ["defaults:", *choices]
    lines += ["", *_emit(tree, 0)] if tree else []
    return "\n".join(lines) + "\n"


def _comment(search: Search, best: SearchJob, key: str, provenance: str) -> str:
    if key not in search.varied:
        return "  # as every job of the search ran (not tuned)"
    from llmstack.report.capacity_data import num

    by_value: dict[str, list[SearchJob]] = {}
    for job in search.jobs:
        by_value.setdefault(job.settings().get(key, "(default)"), []).append(job)
    tried = []
    for value, jobs in by_value.items():
        found = [j.per_device for j in jobs if j.per_device is not None]
        statuses = sorted({j.status for j in jobs})
        tried.append(f"{value} -> {num(max(found)) if found else '/'.join(statuses)}")
    return (f"  # tuned: capacity {num(best.capacity)} ({num(best.per_device)} per device); best per device "
            f"at each value tried: {', '.join(tried)}; {provenance}")  # fmt: skip


def device_text(job_dir: Path) -> str:
    """The device the job ran on, from its config.yaml (and the host's CPU from doctor.json on cpu)."""
    config = _read_yaml(job_dir / "config.yaml").get("device") or {}
    name, count = config.get("name", "?"), config.get("count") or 1
    parts = [f"device={name} x{count}"]
    if config.get("product"):
        parts.append(str(config["product"]))
    if config.get("memory_gib"):
        parts.append(f"{config['memory_gib']:g} GiB each")
    if name == "cpu":
        host = (read_json(job_dir / "doctor.json") or {}).get("host") or {}
        if host.get("cpu"):
            parts.append(f"{host['cpu']}, {host.get('cpu_count', '?')} cores")
    return " ".join(parts[:1]) + (f" ({', '.join(parts[1:])})" if parts[1:] else "")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _emit(tree: dict[str, Any], depth: int) -> list[str]:
    lines = []
    pad = "  " * depth
    for key, node in tree.items():
        if isinstance(node, dict):
            lines += [f"{pad}{key}:", *_emit(node, depth + 1)]
        else:
            value, comment = node
            text = yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]
            lines.append(f"{pad}{key}: {text}{comment}")
    return lines
