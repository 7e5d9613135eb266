"""The benchmark phases and how a run chains them.

A phase is prepared before anything starts (datasets read, prompts built: a bad file fails at once, not after
a minute of engine start-up), then run: against the ready server, or, for a phase that needs none
(offline_throughput), instead of starting one. Each phase lives in its own module under `phases/`; this
registry only knows their names, modules, and whether they need a server.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llmstack.bench.phases.common import PhaseContext
from llmstack.config.schema import RunConfig
from llmstack.results.rundir import RunDir
from llmstack.serving.plan import LaunchPlan

__all__ = ["PHASES", "PhaseContext", "PreparedPhase", "needs_server", "prepare_phase"]


class PreparedPhase(Protocol):
    def run(self, server: Any | None) -> None:
        """Measure, write the phase's files, and fill the context's summary; raise on failure."""
        ...


@dataclass(frozen=True)
class PhaseSpec:
    # Module with `prepare(ctx: PhaseContext) -> PreparedPhase`.
    module: str
    needs_server: bool = True


PHASES: dict[str, PhaseSpec] = {
    "online": PhaseSpec("llmstack.bench.phases.online"),
    "multimodal": PhaseSpec("llmstack.bench.phases.multimodal"),
    "rps": PhaseSpec("llmstack.bench.phases.rps"),
    "offline_throughput": PhaseSpec("llmstack.bench.phases.offline_throughput", needs_server=False),
}


def needs_server(phase: str) -> bool:
    """Whether a run with this benchmark phase starts the engine's server (`none` serves, so it does)."""
    spec = PHASES.get(phase)
    return spec is None or spec.needs_server


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
    module = importlib.import_module(spec.module)
    summary.update({"name": run.benchmark.name, "phase": run.benchmark.phase})
    ctx = PhaseContext(run=run, plan=plan, rundir=rundir, summary=summary, save=save, enter=enter)
    return module.prepare(ctx)
