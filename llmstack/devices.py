"""What accelerators this host has, found without importing torch (the launcher must start fast).

NVIDIA GPUs are read from /proc/driver/nvidia/gpus (or nvidia-smi); Intel GPUs from the DRM render nodes
whose PCI vendor is 0x8086 and whose driver is i915 or xe. The doctor (llmstack.doctor) asks torch too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

INTEL_VENDOR = "0x8086"
INTEL_GPU_DRIVERS = ("i915", "xe")


@dataclass(frozen=True)
class Inventory:
    cuda: int = 0
    xpu: int = 0

    def count(self, kind: str) -> int:
        if kind == "cpu":
            return 1
        return getattr(self, kind, 0)

    def best(self) -> str:
        if self.cuda:
            return "cuda"
        if self.xpu:
            return "xpu"
        return "cpu"


def count_nvidia_gpus(proc_root: Path = Path("/proc/driver/nvidia/gpus")) -> int:
    if proc_root.is_dir():
        return sum(1 for _ in proc_root.iterdir())
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return 0
        return sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return 0


def count_intel_gpus(drm_root: Path = Path("/sys/class/drm")) -> int:
    count = 0
    for node in sorted(drm_root.glob("renderD*")):
        device = node / "device"
        try:
            vendor = (device / "vendor").read_text().strip()
            driver = (device / "driver").resolve().name
        except OSError:
            continue
        if vendor == INTEL_VENDOR and driver in INTEL_GPU_DRIVERS:
            count += 1
    return count


def detect() -> Inventory:
    return Inventory(cuda=count_nvidia_gpus(), xpu=count_intel_gpus())


# Host probes for `python -m llmstack.doctor` (and its quick form at the start of a run). Each is cheap,
# never imports torch, and answers None or [] where this machine has nothing to say.

GIB = 1024**3


@dataclass(frozen=True)
class RenderNode:
    """A DRM render node (/dev/dri/renderD*) and the PCI device behind it."""

    path: str
    vendor: str | None
    device_id: str | None
    driver: str | None
    pci_address: str | None
    # Whether this process may open it (the user is in the `render` group, or root).
    accessible: bool


def render_nodes(
    dev_root: Path = Path("/dev/dri"), drm_root: Path = Path("/sys/class/drm")
) -> list[RenderNode]:
    nodes = []
    for node in sorted(dev_root.glob("renderD*")):
        device = drm_root / node.name / "device"
        nodes.append(
            RenderNode(
                path=str(node),
                vendor=_read(device / "vendor"),
                device_id=_read(device / "device"),
                driver=_link_name(device / "driver"),
                pci_address=_link_name(device),
                accessible=os.access(node, os.R_OK | os.W_OK),
            )
        )
    return nodes


def host_memory_gib(meminfo: Path = Path("/proc/meminfo")) -> dict[str, float]:
    """MemTotal and MemAvailable in GiB ({} when /proc/meminfo is unreadable)."""
    found: dict[str, float] = {}
    text = _read(meminfo) or ""
    for key, name in (("MemTotal", "total"), ("MemAvailable", "available")):
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        if match:
            found[name] = round(int(match.group(1)) * 1024 / GIB, 2)
    return found


def shm_size_gib(path: str = "/dev/shm") -> float | None:
    """Size of the shared-memory mount (Docker's default is 64 MiB; --shm-size raises it)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return round(st.f_blocks * st.f_frsize / GIB, 2)


@dataclass(frozen=True)
class ToolDevice:
    """A GPU as an external tool (nvidia-smi, sycl-ls, xpu-smi) lists it."""

    kind: str
    index: int
    name: str
    memory_gib: float | None = None
    driver: str | None = None
    source: str = ""


def nvidia_smi_devices(timeout: float = 5.0) -> list[ToolDevice] | None:
    """None when nvidia-smi is not installed."""
    out = _run_tool(
        ["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader,nounits"],
        timeout,
    )
    if out is None:
        return None
    devices = []
    for line in out.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            memory = round(float(parts[2]) / 1024, 2) if _is_number(parts[2]) else None
            devices.append(ToolDevice("cuda", int(parts[0]), parts[1], memory, parts[3], "nvidia-smi"))
    return devices


# `[level_zero:gpu:0] Intel(R) Level-Zero, Intel(R) Arc(TM) A770 Graphics 1.3 [1.3.26241]` (older oneAPI) or
# `[level_zero:gpu][level_zero:0] Intel(R) oneAPI Unified Runtime over Level-Zero, <name> 12.55.8 [1.3.29735]`
_SYCL_LS_LINE = re.compile(
    r"^\[level_zero:gpu(?::(?P<old>\d+))?\](?:\[level_zero:(?P<new>\d+)\])?\s+[^,]+,\s+"
    r"(?P<name>.+?)\s+[\d.]+\s+\[(?P<driver>[^\]]+)\]\s*$"
)


def parse_sycl_ls(text: str) -> list[ToolDevice]:
    """The Level Zero GPUs in `sycl-ls` output (OpenCL lines list the same cards again)."""
    devices = []
    for line in text.splitlines():
        match = _SYCL_LS_LINE.match(line.strip())
        if match:
            index = int(match.group("old") or match.group("new") or len(devices))
            devices.append(
                ToolDevice("xpu", index, match.group("name"), None, match.group("driver"), "sycl-ls")
            )
    return devices


def sycl_ls_devices(timeout: float = 20.0) -> list[ToolDevice] | None:
    """None when sycl-ls is not installed."""
    out = _run_tool(["sycl-ls"], timeout)
    return None if out is None else parse_sycl_ls(out)


def xpu_smi_devices(timeout: float = 20.0) -> list[ToolDevice] | None:
    """`xpu-smi discovery -j`; None when xpu-smi is not installed."""
    import json

    out = _run_tool(["xpu-smi", "discovery", "-j"], timeout)
    if out is None:
        return None
    try:
        listed = json.loads(out).get("device_list", [])
    except (ValueError, AttributeError):
        return []
    devices = []
    for position, entry in enumerate(listed):
        memory = next((v for k, v in entry.items() if "memory_physical_size" in k and _is_number(v)), None)
        devices.append(
            ToolDevice(
                "xpu",
                int(entry.get("device_id", position)),
                str(entry.get("device_name", "?")),
                round(float(memory) / GIB, 2) if memory is not None else None,
                None,
                "xpu-smi",
            )
        )
    return devices


def _run_tool(argv: list[str], timeout: float) -> str | None:
    """The tool's stdout; None when it is not installed; "" when it fails or times out."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _link_name(path: Path) -> str | None:
    try:
        return path.resolve(strict=True).name
    except OSError:
        return None


def _is_number(text: object) -> bool:
    try:
        float(str(text))
    except ValueError:
        return False
    return True
