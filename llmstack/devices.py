"""What accelerators this host has, found without importing torch (the launcher must start fast).

NVIDIA GPUs are read from /proc/driver/nvidia/gpus (or nvidia-smi); Intel GPUs from the DRM render nodes
whose PCI vendor is 0x8086 and whose driver is i915 or xe. The doctor (llmstack.doctor) asks torch too.
"""

from __future__ import annotations

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
