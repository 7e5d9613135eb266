"""The worker's Prometheus metrics, rendered in the text exposition format (version 0.0.4) by hand.

Written here rather than with prometheus_client because the ipex-llm venv does not have it, and the set is
small. Names follow vLLM's (`vllm:num_requests_running` -> `llmstack:num_requests_running`), so dashboards
translate. Updated from the scheduler thread; read from the event loop: plain int/float updates under the
GIL, and a scrape may see a step half-counted, which Prometheus tolerates.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)
FINISH_REASONS = ("stop", "length", "abort", "error")


class Histogram:
    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value


class WorkerMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        # Gauges are read through callables set by the scheduler (its own queue lengths).
        self.running: Callable[[], int] = lambda: 0
        self.waiting: Callable[[], int] = lambda: 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.rejected = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        # What the model loop reports of itself beyond its queues (the pipeline: each stage's busy seconds,
        # micro-batches in flight); None for the single-process loop.
        self.model_stats: dict[str, Any] | None = None

    def render(self) -> str:
        label = f'model_name="{_escape(self.model_name)}"'
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, str, float]]) -> None:
            out.append(f"# HELP llmstack:{name} {help_text}")
            out.append(f"# TYPE llmstack:{name} {kind}")
            for suffix, labels, value in samples:
                out.append(f"llmstack:{name}{suffix}{{{labels}}} {_number(value)}")

        metric(
            "num_requests_running", "gauge", "Requests in the running batch.", [("", label, self.running())]
        )
        metric(
            "num_requests_waiting",
            "gauge",
            "Requests waiting for a batch slot.",
            [("", label, self.waiting())],
        )
        metric(
            "prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", label, self.prompt_tokens)]
        )
        metric(
            "generation_tokens_total", "counter", "Tokens generated.", [("", label, self.generation_tokens)]
        )
        metric(
            "request_success_total",
            "counter",
            "Requests finished, by finish reason.",
            [("", f'{label},finished_reason="{r}"', n) for r, n in self.finished.items()],
        )
        metric(
            "request_rejected_total",
            "counter",
            "Requests refused because the queue was full.",
            [("", label, self.rejected)],
        )
        for name, help_text, hist in (
            ("time_to_first_token_seconds", "Arrival to first generated token.", self.ttft),
            ("e2e_request_latency_seconds", "Arrival to last generated token.", self.e2e),
        ):
            samples: list[tuple[str, str, float]] = []
            cumulative = 0
            for bound, n in zip((*hist.bounds, float("inf")), hist.counts, strict=True):
                cumulative += n
                samples.append(("_bucket", f'{label},le="{_number(bound)}"', cumulative))
            samples.append(("_sum", label, hist.total))
            samples.append(("_count", label, hist.count))
            metric(name, "histogram", help_text, samples)
        if self.model_stats is not None:
            self._render_pipeline(metric, label, self.model_stats)
        return "\n".join(out) + "\n"

    @staticmethod
    def _render_pipeline(metric: Callable[..., None], label: str, stats: dict[str, Any]) -> None:
        for name, key, help_text in (
            ("pipeline_stage_busy_seconds_total", "stage_busy_seconds",
             "Seconds each pipeline stage spent computing (busy fraction: its rate)."),
            ("pipeline_stage_cpu_seconds_total", "stage_cpu_seconds",
             "CPU seconds of each stage's computing thread (below busy seconds while it waits for a core)."),
        ):  # fmt: skip
            per_stage = stats.get(key, [])
            metric(
                name,
                "counter",
                help_text,
                [("", f'{label},stage="{i}"', float(v)) for i, v in enumerate(per_stage)],
            )
        metric(
            "pipeline_micro_batches_in_flight",
            "gauge",
            "Micro-batches between their first stage and their return to rank 0.",
            [("", label, stats.get("in_flight", 0))],
        )
        steps = [("", label, stats.get("steps", 0))]
        metric("pipeline_steps_total", "counter", "Micro-batch steps issued.", steps)


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(float(value))
    return repr(float(value))


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
