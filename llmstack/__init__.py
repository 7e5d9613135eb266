"""llmstack: declarative launcher and benchmarks for serving LLMs on Intel GPUs, CPUs and NVIDIA GPUs."""

from __future__ import annotations

__version__ = "0.1.0"
