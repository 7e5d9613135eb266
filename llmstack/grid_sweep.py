"""A grid's life in the sweeper's process: every job checked before the first starts, its own directory, the
job list (grid.json) and report at the end, one exit status.

The sweeper (hydra_plugins/llmstack_sweeper) calls plan_sweep() with every job's overrides, then start(),
launches the runnable jobs, then finish(). Checking composes, resolves, validates and plans each job with
nothing started: a bad combination is found before hours of the jobs ahead of it, and all of them at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmstack.grid import GridJob, job_dir_name, write_failure

logger = logging.getLogger(__name__)

# README, "Exit status": some jobs of a grid failed (their count is printed); 2 when jobs were invalid and
# none started.
SOME_JOBS_FAILED = 5
# The default experiment_name of configs/config.yaml: a grid that keeps it gets a directory of its own.
_UNNAMED = "${llmstack.today:}"
# Launchers that run jobs on this host: only there do host checks (interpreter, port, model path) say
# anything about the jobs.
_LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher")

# Set by finish() (or by start() when it refuses): the CLI's exit status for the sweep.
last_status: int | None = None


@dataclass
class PlannedJob:
    overrides: list[str]
    name: str
    error: str | None = None  # why it cannot run, one paragraph


@dataclass
class SweepPlan:
    directory: Path
    dry_run: bool
    jobs: list[PlannedJob]
    started_at: float = field(default_factory=time.time)

    @property
    def invalid(self) -> list[PlannedJob]:
        return [job for job in self.jobs if job.error is not None]

    @property
    def runnable(self) -> list[PlannedJob]:
        return [job for job in self.jobs if job.error is None]

    @property
    def launch_directory(self) -> Path:
        """Hydra's sweep dir, which launchers create: the grid's, or for a dry run (which writes nothing)
        the current directory, which exists."""
        return (Path.cwd() if self.dry_run else self.directory).absolute()

    def launch_overrides(self, job: PlannedJob) -> list[str]:
        """The job's overrides plus where it writes, for the launcher's jobs here, in joblib's workers or
        on a Ray node alike."""
        return [*job.overrides, f"hydra.sweep.dir={_quoted(str(self.launch_directory))}"]


def plan_sweep(
    config: DictConfig,
    jobs: list[list[str]],
    compose: Callable[[list[str]], DictConfig],
    launcher_target: str,
) -> SweepPlan:
    """Every job checked as a run of it would be, before any starts."""
    global last_status
    last_status = None
    dry_run = bool(OmegaConf.select(config, "dry_run", default=False))
    host_checks = not dry_run and any(name in launcher_target for name in _LOCAL_LAUNCHERS)
    planned = [
        PlannedJob(overrides, job_dir_name(overrides), check_job(overrides, compose, host_checks))
        for overrides in jobs
    ]
    return SweepPlan(grid_directory(config, jobs), dry_run, planned)


def check_job(
    overrides: list[str], compose: Callable[[list[str]], DictConfig], host_checks: bool
) -> str | None:
    """Why this job cannot run (one paragraph), or None. Starts nothing, writes nothing, prints nothing."""
    from hydra.errors import HydraException

    from llmstack.config import CONFIG_DIR
    from llmstack.config.resolve import resolve, to_run_config
    from llmstack.engines import get_engine
    from llmstack.errors import LlmstackError, describe_unexpected
    from llmstack.validation import validate

    try:
        cfg = _task_config(compose(list(overrides)))
        run = resolve(to_run_config(cfg), CONFIG_DIR)
        validate(run, CONFIG_DIR, host_checks=host_checks)
        get_engine(run.engine.name).plan(run)
    except LlmstackError as exc:
        return str(exc)
    except HydraException as exc:
        from llmstack.config.hydra_errors import describe

        error = describe(exc, overrides, CONFIG_DIR)
        return str(error) if error is not None else " ".join(str(exc).split())
    except Exception as exc:  # a job that would fail the same way when it ran
        return describe_unexpected(exc)
    return None


def _task_config(cfg: DictConfig) -> DictConfig:
    """The config a job's task gets: Hydra's run_job removes Hydra's own node the same way."""
    from omegaconf import open_dict, read_write

    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def grid_directory(config: DictConfig, jobs: list[list[str]]) -> Path:
    """results/<experiment_name>/, or for a grid left unnamed, a directory of its own under the day's:
    results/<date>/grid-<what varied>-<hash of its jobs>/ (the same command finds it again, to resume)."""
    results = Path(str(config.results_dir))
    named = OmegaConf.to_container(config, resolve=False).get("experiment_name") != _UNNAMED  # type: ignore[union-attr]
    if named:
        return results / str(config.experiment_name)
    names = sorted(job_dir_name(job) for job in jobs)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]
    axes = "+".join(varied_keys(jobs)) or "jobs"
    axes = "".join(c if c.isalnum() or c in "._+-" else "_" for c in axes)[:60]
    return results / str(config.experiment_name) / f"grid-{axes}-{digest}"


def varied_keys(jobs: list[list[str]]) -> list[str]:
    """The keys whose values differ between jobs, in command-line order."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            values.setdefault(key.lstrip("+~"), set()).add(value)
    return [key for key, seen in values.items() if len(seen) > 1 or any(key not in _keys(j) for j in jobs)]


def start(plan: SweepPlan, config: DictConfig, keep_going: bool) -> bool:
    """Say what is wrong, then whether to launch; writes the grid's files (none for a dry run)."""
    global last_status
    from llmstack.config.secrets import mask_override, masked_sweep_config, scrub, secret_values

    for job in plan.invalid:
        shown = " ".join(mask_override(o) for o in job.overrides)
        error = scrub(str(job.error), secret_values(job.overrides))
        print(f"llmstack: grid job {shown}: {error}", file=sys.stderr)
    if plan.invalid and not keep_going:
        print(
            f"llmstack: {len(plan.invalid)} of {len(plan.jobs)} grid jobs are invalid, so none was started "
            "(hydra.sweeper.keep_going_on_invalid=true runs the valid ones)",
            file=sys.stderr,
        )
        last_status = 2
        return False
    if plan.dry_run:
        return True
    from llmstack.results.files import write_text_atomic

    plan.directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan.directory / "multirun.yaml", OmegaConf.to_yaml(masked_sweep_config(config)))
    jobs = [{"name": job.name, "overrides": [mask_override(o) for o in job.overrides]} for job in plan.jobs]
    listing = {"jobs": jobs, "varied": varied_keys([job.overrides for job in plan.jobs])}
    write_text_atomic(plan.directory / "grid.json", json.dumps(listing, indent=2) + "\n")
    for index, job in enumerate(plan.jobs):
        if job.error is not None:
            job_dir = plan.directory / job.name
            write_failure(job_dir, GridJob(job.name, job.overrides, index, plan.directory), "validate",
                          InvalidJob(job.error))  # fmt: skip
    return True


def finish(plan: SweepPlan) -> None:
    """The report of exactly this grid's jobs, and the exit status: SOME_JOBS_FAILED with the count."""
    global last_status
    failed = len(plan.invalid) + (0 if plan.dry_run else sum(_failed_now(plan, job) for job in plan.runnable))
    if failed:
        where = "dry run: nothing written" if plan.dry_run else f"see their failure.json in {plan.directory}"
        print(f"llmstack: {failed} of {len(plan.jobs)} grid jobs failed ({where}); "
              f"exit status {SOME_JOBS_FAILED}", file=sys.stderr)  # fmt: skip
    last_status = SOME_JOBS_FAILED if failed else 0
    if plan.dry_run:
        return
    from llmstack.report import build_report

    try:
        written = build_report(plan.directory, [job.name for job in plan.jobs])
    except Exception:  # the report must never hide the grid's own outcome
        logger.exception("could not build the report of %s", plan.directory)
        return
    logger.info("grid done: %d of %d jobs failed; report: %s", failed, len(plan.jobs),
                ", ".join(str(p) for p in written))  # fmt: skip


def _failed_now(plan: SweepPlan, job: PlannedJob) -> bool:
    failure = plan.directory / job.name / "failure.json"
    try:
        return failure.stat().st_mtime >= plan.started_at - 1
    except OSError:
        return False


class InvalidJob(Exception):
    """A job found invalid before the grid started (its error already one paragraph)."""

    exit_code = 2


def _keys(job: list[str]) -> set[str]:
    return {o.partition("=")[0].lstrip("+~") for o in job}


def _quoted(text: str) -> str:
    """A value Hydra's override grammar reads back as this exact string."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
