"""The benchmark client: load generation over HTTP, per-request records, metrics and reports.

It knows only HTTP and the OpenAI API, so it measures any compatible server. Submodules are imported on
demand to keep `import llmstack.bench` cheap: `records`, `http`, `loadgen`, `metrics`, `report`.
"""

from __future__ import annotations
