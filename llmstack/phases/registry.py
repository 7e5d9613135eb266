"""The benchmark phases and how a run chains them.

A phase is prepared before anything starts (datasets read, prompts built: a bad file fails at once, not after
a minute of engine start-up), then run: against the ready server, or, for a phase that needs none
(offline_throughput), instead of starting one. Each phase lives in its own module, with its config schema
and its rules; this registry knows their names, schemas, rules and whether they need a server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from llmstack.config.schema import BenchmarkConfig, RunConfig
from llmstack.errors import ConfigError
from llmstack.phases import multimodal, offline_throughput, online, rps
from llmstack.phases.common import PhaseContext
from llmstack.results.rundir import RunDir
from llmstack.serving.plan import LaunchPlan

__all__ = [
    "BENCHMARK_SCHEMAS",
    "PHASES",
    "PhaseContext",
    "PreparedPhase",
    "benchmark_host_problems",
    "benchmark_problems",
    "needs_server",
    "prepare_phase",
]


class PreparedPhase(Protocol):
    def run(self, server: Any | None) -> None:
        """Measure, write the phase's files, and fill the context's summary; raise on failure."""
        ...


@dataclass(frozen=True)
class PhaseSpec:
    # `CONFIG` (the schema), `problems(run, b)`, `host_problems(run, b)`, `prepare(ctx) -> PreparedPhase`.
    module: ModuleType
    needs_server: bool = True

    @property
    def schema(self) -> type[BenchmarkConfig]:
        return self.module.CONFIG  # type: ignore[no-any-return]


PHASES: dict[str, PhaseSpec] = {
    "online": PhaseSpec(online),
    "multimodal": PhaseSpec(multimodal),
    "rps": PhaseSpec(rps),
    "offline_throughput": PhaseSpec(offline_throughput, needs_server=False),
}

# benchmark.phase -> its schema; the benchmark group's YAMLs start from these (config/store.py registers
# them). `none` serves until interrupted and has no options beyond the base's.
BENCHMARK_SCHEMAS: dict[str, type[BenchmarkConfig]] = {
    "none": BenchmarkConfig,
    **{name: spec.schema for name, spec in PHASES.items()},
}


def needs_server(phase: str) -> bool:
    """Whether a run with this benchmark phase starts the engine's server (`none` serves, so it does)."""
    spec = PHASES.get(phase)
    return spec is None or spec.needs_server


def benchmark_problems(run: RunConfig) -> Iterator[ConfigError]:
    """Config rules: the phase is known and composed with its own options, then the phase's own rules."""
    b = run.benchmark
    phase = b.phase
    if phase not in BENCHMARK_SCHEMAS:
        yield ConfigError("benchmark.phase", phase, "is not a benchmark phase.", sorted(BENCHMARK_SCHEMAS))
        return
    if type(b) is not BENCHMARK_SCHEMAS[phase]:
        composed = next(p for p, schema in BENCHMARK_SCHEMAS.items() if type(b) is schema)
        yield ConfigError(
            "benchmark.phase",
            phase,
            f"benchmark={b.name} composed the options of the {composed} phase; a phase's options come with "
            "its group option.",
            hint=f"Select it with benchmark={phase} (or a preset of that phase) instead of setting "
            "benchmark.phase.",
        )
        return
    spec = PHASES.get(phase)
    if spec is not None:
        yield from spec.module.problems(run, b)


def benchmark_host_problems(run: RunConfig) -> Iterator[ConfigError]:
    """Host rules (files and programs on this machine; skipped by dry runs)."""
    b = run.benchmark
    spec = PHASES.get(b.phase)
    if spec is not None and type(b) is spec.schema:
        yield from spec.module.host_problems(run, b)


def prepare_phase(
    run: RunConfig,
    plan: LaunchPlan,
    rundir: RunDir,
    summary: dict[str, Any],
    *,
    save: Callable[[], None],
    enter: Callable[[str], None],
) -> PreparedPhase | None:
    """The run's benchmark phase, ready to run; None for `none`. `summary` is filled as results come in,
    `save()` writes it to disk, `enter(name)` names the run's current phase."""
    spec = PHASES.get(run.benchmark.phase)
    if spec is None:
        return None
    summary.update({"name": run.benchmark.name, "phase": run.benchmark.phase})
    ctx = PhaseContext(run=run, plan=plan, rundir=rundir, summary=summary, save=save, enter=enter)
    return spec.module.prepare(ctx)  # type: ignore[no-any-return]
