"""The benchmark phases and how a run chains them.

A phase is prepared before anything starts (datasets read, prompts built: a bad file fails at once, not after
a minute of engine start-up), then run: against the ready server, or, for a phase that needs none
(offline_throughput), instead of starting one. Each phase lives in its own module, with its config schema
and its rules; this registry knows their names, schemas, rules and whether they need a server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from llmstack.config.schema import BenchmarkConfig, RunConfig
from llmstack.errors import ConfigError
from llmstack.lazy_registry import LazyRegistry

if TYPE_CHECKING:
    from llmstack.results.rundir import RunDir
    from llmstack.serving.plan import LaunchPlan

__all__ = [
    "PHASES",
    "PreparedPhase",
    "benchmark_host_problems",
    "benchmark_problems",
    "benchmark_schema",
    "benchmark_schemas",
    "needs_server",
    "prepare_phase",
]


class PreparedPhase(Protocol):
    def run(self, server: Any | None) -> None:
        """Measure, write the phase's files, and fill the context's summary; raise on failure."""
        ...


# benchmark.phase -> its module: the schema `CONFIG`, `problems(run, b)`, `host_problems(run, b)` and
# `prepare(ctx) -> PreparedPhase`. Imported when picked (or when Hydra composes: config/store.py).
PHASES: LazyRegistry[ModuleType] = LazyRegistry(
    {
        "online": "llmstack.phases.online",
        "multimodal": "llmstack.phases.multimodal",
        "rps": "llmstack.phases.rps",
        "capacity": "llmstack.phases.capacity",
        "offline_throughput": "llmstack.phases.offline_throughput",
    }
)
# The phases that run instead of the engine's server rather than against it.
_SERVERLESS = frozenset({"offline_throughput"})


def benchmark_schema(phase: str) -> type[BenchmarkConfig] | None:
    """The schema of a benchmark.phase; `none` serves until interrupted and has only the base's options."""
    if phase == "none":
        return BenchmarkConfig
    module = PHASES.get(phase)
    return None if module is None else module.CONFIG  # type: ignore[no-any-return]


def benchmark_schemas() -> dict[str, type[BenchmarkConfig]]:
    """Every phase's schema (importing every phase); the benchmark group's YAMLs start from these."""
    return {"none": BenchmarkConfig, **{name: module.CONFIG for name, module in PHASES.items()}}


def needs_server(phase: str) -> bool:
    """Whether a run with this benchmark phase starts the engine's server (`none` serves, so it does)."""
    return phase not in _SERVERLESS


def benchmark_problems(run: RunConfig) -> Iterator[ConfigError]:
    """Config rules: the phase is known and composed with its own options, then the phase's own rules."""
    b = run.benchmark
    phase = b.phase
    schema = benchmark_schema(phase)
    if schema is None:
        yield ConfigError("benchmark.phase", phase, "is not a benchmark phase.", ["none", *PHASES.names()])
        return
    if type(b) is not schema:
        composed = next(p for p, s in benchmark_schemas().items() if type(b) is s)
        yield ConfigError(
            "benchmark.phase",
            phase,
            f"benchmark={b.name} composed the options of the {composed} phase; a phase's options come with "
            "its group option.",
            hint=f"Select it with benchmark={phase} (or a preset of that phase) instead of setting "
            "benchmark.phase.",
        )
        return
    module = PHASES.get(phase)
    if module is not None:
        yield from module.problems(run, b)


def benchmark_host_problems(run: RunConfig) -> Iterator[ConfigError]:
    """Host rules (files and programs on this machine; skipped by dry runs)."""
    b = run.benchmark
    module = PHASES.get(b.phase)
    if module is not None and type(b) is module.CONFIG:
        yield from module.host_problems(run, b)


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
    module = PHASES.get(run.benchmark.phase)
    if module is None:
        return None
    from llmstack.phases.common import PhaseContext

    summary.update({"name": run.benchmark.name, "phase": run.benchmark.phase})
    ctx = PhaseContext(run=run, plan=plan, rundir=rundir, summary=summary, save=save, enter=enter)
    return module.prepare(ctx)  # type: ignore[no-any-return]
