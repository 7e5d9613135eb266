"""`python -m llmstack.doctor`: which devices this machine has, what serves on them, and which profiles fit.

It reports the host (RAM, /dev/shm, kernel), the DRM render nodes under /dev/dri, Intel GPUs as `sycl-ls` and
`xpu-smi` list them, NVIDIA GPUs as `nvidia-smi` lists them, driver and runtime packages, and for each engine
interpreter (engines live in their own venvs) its package versions and the CUDA/XPU devices its torch sees,
with their memory. Then, for every configs/profile/*.yaml, whether this machine has the devices it plans for.

    python -m llmstack.doctor [--python PATH ...] [--json] [--quick]

`--quick` skips what is slow or touches the GPUs (importing torch, sycl-ls, xpu-smi): Session runs it at the
end of every real run (never competing with the engine or the benchmark) and stores it as doctor.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmstack import devices

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "doctor_probe.py"
# Intel GPU runtime packages: Debian/Ubuntu names of compute runtime, Level Zero and the graphics compiler.
INTEL_RUNTIME_PACKAGES = (
    "intel-opencl-icd",
    "libze1",
    "libze-intel-gpu1",
    "intel-level-zero-gpu",
    "level-zero",
    "intel-igc-core",
    "intel-igc-core-2",
    "xpu-smi",
)
# A detected card whose memory is this close to a profile's still fits it (drivers round differently).
MEMORY_TOLERANCE = 0.97


def default_pythons() -> list[str]:
    """This interpreter and the repository's engine venvs that exist (scripts/setup.sh makes them)."""
    candidates = [sys.executable, str(REPO / ".venv/bin/python"), str(REPO / ".venv-ipex/bin/python")]
    seen: list[str] = []
    for python in candidates:
        # abspath, not realpath: a venv's python is a symlink to the base one, with other site-packages.
        if os.path.isfile(python) and os.path.abspath(python) not in map(os.path.abspath, seen):
            seen.append(python)
    return seen


def probe_interpreter(python: str, *, with_devices: bool, timeout: float) -> dict[str, Any]:
    argv = [python, str(PROBE), *(["--devices"] if with_devices else [])]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"python": python, "error": f"{type(exc).__name__}: {exc}"}
    try:
        return json.loads(done.stdout)
    except ValueError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"python": python, "error": f"exit {done.returncode}: {tail[0]}"}


def host_facts() -> dict[str, Any]:
    memory = devices.host_memory_gib()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_total_gib": memory.get("total"),
        "ram_available_gib": memory.get("available"),
        "shm_gib": devices.shm_size_gib(),
    }


def driver_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "kernel_modules": [m for m in ("i915", "xe", "nvidia") if Path("/sys/module", m).is_dir()],
        "packages": _dpkg_versions(INTEL_RUNTIME_PACKAGES),
    }
    nvidia = Path("/proc/driver/nvidia/version")
    if nvidia.is_file():
        facts["nvidia_driver"] = nvidia.read_text(errors="replace").splitlines()[0].strip()
    oneapi_ccl = sorted(p.name for p in Path("/opt/intel/oneapi/ccl").glob("*") if p.name != "latest")
    facts["oneccl"] = {
        "oneapi_ccl_versions": oneapi_ccl,
        "ipex_llm_1ccl_wks": Path("/opt/intel/1ccl-wks").is_dir(),
        "CCL_ROOT": os.environ.get("CCL_ROOT"),
    }
    return facts


def collect(pythons: list[str] | None = None, *, quick: bool = False, config_dir: Path | None = None) -> dict:
    """The whole report as JSON-ready data."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    pythons = pythons or default_pythons()
    listers = {"nvidia-smi": devices.nvidia_smi_devices}
    if not quick:
        listers.update({"sycl-ls": devices.sycl_ls_devices, "xpu-smi": devices.xpu_smi_devices})
    # The probes wait on other processes (torch imports take seconds): run them side by side.
    with ThreadPoolExecutor(max_workers=len(pythons) + len(listers)) as pool:
        probes = [
            pool.submit(probe_interpreter, p, with_devices=not quick, timeout=10.0 if quick else 180.0)
            for p in pythons
        ]
        listed = {name: pool.submit(lister) for name, lister in listers.items()}
        interpreters = [probe.result() for probe in probes]
        tools: dict[str, Any] = {
            name: None if (found := future.result()) is None else [asdict(d) for d in found]
            for name, future in listed.items()
        }
    inventory = devices.detect()
    found = merged_devices(interpreters, tools, inventory)
    report: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "host": host_facts(),
        "render_nodes": [asdict(n) for n in devices.render_nodes()],
        "drivers": driver_facts(),
        "tools": tools,
        "interpreters": interpreters,
        "inventory": {"cuda": inventory.cuda, "xpu": inventory.xpu},
        "devices": found,
    }
    from llmstack.config import CONFIG_DIR

    report["profiles"] = profile_fits(found, config_dir or CONFIG_DIR)
    report["summary"] = summary_lines(report)
    report["elapsed_s"] = round(time.monotonic() - started, 3)
    return report


def merged_devices(
    interpreters: list[dict[str, Any]], tools: dict[str, Any], inventory: devices.Inventory
) -> dict[str, list[dict[str, Any]]]:
    """Per kind, the best-informed list: torch's (names and memory), else a tool's, else sysfs's count."""
    found: dict[str, list[dict[str, Any]]] = {}
    for kind, tool_names, sysfs_count in (
        ("cuda", ("nvidia-smi",), inventory.cuda),
        ("xpu", ("xpu-smi", "sycl-ls"), inventory.xpu),
    ):
        candidates = []
        for info in interpreters:
            listed = [d for d in info.get("torch", {}).get("devices", []) if d["kind"] == kind]
            candidates.append([{**d, "source": f"torch in {info.get('python')}"} for d in listed])
        candidates += [tools.get(name) or [] for name in tool_names]
        best = max(candidates, key=len, default=[])
        if len(best) < sysfs_count:
            best = [
                {"kind": kind, "index": i, "name": None, "memory_gib": None, "source": "render node (sysfs)"}
                for i in range(sysfs_count)
            ]
        found[kind] = best
    return found


def load_profiles(config_dir: Path) -> dict[str, dict[str, Any]]:
    """Each profile's device plan: kind, count, memory_gib, product (its own values, not composed)."""
    from llmstack.config.groups import config_groups

    groups = config_groups(Path(config_dir))
    plans = {}
    for profile in groups.options("profile"):
        device = (groups.config("profile", profile) or {}).get("device") or {}
        plans[profile] = {
            "kind": groups.picks("profile", profile, "device") or "auto",
            "count": device.get("count") or 1,
            "memory_gib": device.get("memory_gib"),
            "product": device.get("product"),
        }
    return plans


def profile_fits(found: dict[str, list[dict[str, Any]]], config_dir: Path) -> list[dict[str, Any]]:
    results = []
    for name, plan in load_profiles(config_dir).items():
        verdict, why = _fit(plan, found)
        results.append({"profile": name, **plan, "fits": verdict, "why": why})
    return results


def _fit(plan: dict[str, Any], found: dict[str, list[dict[str, Any]]]) -> tuple[str, str]:
    kind, count = plan["kind"], plan["count"]
    if kind == "cpu":
        return "yes", "the host CPU"
    have = found.get(kind, [])
    if len(have) < count:
        return "no", f"needs {count} {kind} device(s), found {len(have)}"
    named = [d for d in have if d.get("name")]
    if not named:
        return "maybe", f"{len(have)} {kind} device(s) found, model unknown (no torch {kind} or sycl-ls here)"
    product = plan["product"]
    matching = [d for d in named if not product or re.search(product, d["name"], re.IGNORECASE)]
    if len(matching) < count:
        names = ", ".join(sorted({d["name"] for d in named}))
        return "no", f"needs {count} x {product}, found {names}"
    wanted, sizes = plan["memory_gib"], [d["memory_gib"] for d in matching if d.get("memory_gib")]
    if wanted and sizes and min(sizes) < wanted * MEMORY_TOLERANCE:
        return "no", f"plans {wanted} GiB per device, found {min(sizes)} GiB"
    return "yes", f"{len(matching)} x {matching[0]['name']}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    found = report["devices"]
    lines = []
    if not found["cuda"] and not found["xpu"]:
        nodes = "no /dev/dri render nodes" if not report["render_nodes"] else "render nodes but no Intel GPU"
        lines.append(f"No GPU: {nodes}, no NVIDIA GPU; serving runs on the CPU (device=cpu).")
    for kind in ("cuda", "xpu"):
        if found[kind]:
            names = sorted({str(d.get("name") or "model unknown") for d in found[kind]})
            lines.append(f"{len(found[kind])} {kind} device(s): {', '.join(names)}.")
    fitting = [p["profile"] for p in report["profiles"] if p["fits"] == "yes"]
    maybe = [p["profile"] for p in report["profiles"] if p["fits"] == "maybe"]
    lines.append(f"Profiles that fit: {', '.join(fitting) or 'none'}.")
    if maybe:
        lines.append(f"Profiles that may fit (card model unknown): {', '.join(maybe)}.")
    shm = report["host"].get("shm_gib")
    if shm is not None and shm < 1:
        lines.append(f"/dev/shm is only {shm} GiB: multi-GPU engines need more (docker run --shm-size=16g).")
    inaccessible = [n["path"] for n in report["render_nodes"] if not n["accessible"]]
    if inaccessible:
        lines.append(f"Not accessible to this user: {', '.join(inaccessible)} (add it to the render group).")
    return lines


def render(report: dict[str, Any]) -> str:
    host = report["host"]
    out = ["llmstack doctor", ""]
    out += [f"  {line}" for line in report["summary"]]
    out += [
        "",
        "Host",
        f"  {host['hostname']}: {host['platform']}",
        f"  CPU: {host['cpu']} ({host['cpu_count']} usable cores)",
        f"  RAM: {host['ram_total_gib']} GiB total, {host['ram_available_gib']} GiB available; "
        f"/dev/shm: {host['shm_gib']} GiB",
        "",
        "Render nodes (/dev/dri)",
    ]
    out += [
        f"  {n['path']}: vendor {n['vendor']} device {n['device_id']} driver {n['driver']} "
        f"at {n['pci_address']}{'' if n['accessible'] else ' (no access)'}"
        for n in report["render_nodes"]
    ] or ["  none"]
    drivers = report["drivers"]
    out += ["", "Drivers and runtimes"]
    modules = ", ".join(drivers["kernel_modules"]) or "none of i915, xe, nvidia"
    out.append(f"  kernel modules loaded: {modules}")
    if "nvidia_driver" in drivers:
        out.append(f"  {drivers['nvidia_driver']}")
    packages = drivers["packages"]
    out.append(
        "  Intel GPU runtime packages: "
        + (", ".join(f"{k} {v}" for k, v in packages.items()) or "none installed (dpkg)")
    )
    ccl = drivers["oneccl"]
    out.append(
        f"  oneCCL: oneAPI {', '.join(ccl['oneapi_ccl_versions']) or 'none'}; ipex-llm /opt/intel/1ccl-wks "
        f"{'present' if ccl['ipex_llm_1ccl_wks'] else 'absent'}; CCL_ROOT={ccl['CCL_ROOT']}"
    )
    out += ["", "GPU tools"]
    for name, listed in report["tools"].items():
        if listed is None:
            out.append(f"  {name}: not installed")
        else:
            shown = "; ".join(_describe(d) for d in listed) or "no devices"
            out.append(f"  {name}: {shown}")
    out += ["", "Engine interpreters"]
    for info in report["interpreters"]:
        out.append(f"  {info.get('python')} (Python {info.get('python_version', '?')})")
        if "error" in info:
            out.append(f"    probe failed: {info['error']}")
            continue
        versions = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
        out.append(f"    {versions or 'none of the known packages'}")
        torch_info = info.get("torch")
        if torch_info is None:
            continue
        if "error" in torch_info:
            out.append(f"    torch: {torch_info['error']}")
            continue
        out.append(
            f"    torch {torch_info['version']}: cuda {_yes(torch_info.get('cuda_available'))} "
            f"(runtime {torch_info.get('cuda_runtime')}), xpu {_yes(torch_info.get('xpu_available'))} "
            f"(runtime {torch_info.get('xpu_runtime')})"
            + (f", xccl {_yes(torch_info['xccl_available'])}" if "xccl_available" in torch_info else "")
        )
        out += [f"    {_describe(d)}" for d in torch_info["devices"]]
    out += ["", "Profiles (configs/profile)"]
    for p in report["profiles"]:
        memory = f", {p['memory_gib']} GiB each" if p["memory_gib"] else ""
        out.append(f"  {p['profile']:<16} {p['fits']:<5} {p['count']} x {p['kind']}{memory}: {p['why']}")
    out += ["", f"({report['mode']} report in {report['elapsed_s']} s)"]
    return "\n".join(out)


def write_report(path: Path, pythons: list[str], *, quick: bool = True) -> None:
    """Collect and write the report to `path` (atomically); never raises: a doctor must not fail a run."""
    try:
        text = json.dumps(collect(pythons, quick=quick), indent=2, default=str)
    except Exception:
        logger.warning("doctor report not collected for %s", path, exc_info=True)
        return
    from llmstack.errors import ResultsError
    from llmstack.results.files import write_text_atomic

    try:
        write_text_atomic(path, text + "\n")
    except ResultsError as exc:  # a full disk says so once, elsewhere: no traceback here
        logger.warning("doctor report not written: %s", exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmstack.doctor", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--python",
        action="append",
        help="an engine interpreter to probe (repeatable; default: this one and the repo's .venv*)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quick", action="store_true", help="skip torch, sycl-ls and xpu-smi (fast)")
    args = parser.parse_args(argv)
    report = collect(args.python, quick=args.quick)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


def _describe(d: dict[str, Any]) -> str:
    memory = f", {d['memory_gib']} GiB" if d.get("memory_gib") is not None else ""
    return f"{d['kind']}:{d['index']} {d.get('name') or '?'}{memory}"


def _yes(flag: object) -> str:
    return "yes" if flag else "no"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or "?"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "?"


def _dpkg_versions(packages: tuple[str, ...]) -> dict[str, str]:
    if not Path("/usr/bin/dpkg-query").exists():
        return {}
    try:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev} ${Version}\n", *packages],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        # "ii" = installed; dpkg-query also lists removed packages whose config files remain.
        if len(parts) == 3 and parts[1] == "ii":
            found[parts[0]] = parts[2]
    return found


if __name__ == "__main__":
    raise SystemExit(main())
