"""A grid's life in the sweeper's process: every job checked before the first starts, its own directory, the
job list (grid.json) and report at the end, one exit status.

The sweeper (hydra_plugins/llmstack_sweeper) calls plan_sweep() with every job's overrides, then start(),
launches the runnable jobs, then finish(). Checking composes, resolves, validates and plans each job with
nothing started: a bad combination is found before hours of the jobs ahead of it, and all of them at once.

A grid whose every job is `benchmark=capacity` is a server-settings search: a combination that validation
or the memory fit refuses (an llmstack ConfigError, not a mistyped command) is pruned instead: counted and
named with its reason (grid.json's `pruned`, the report's first lines), never launched, and no failure of
the grid. Its report is the capacity table, the Pareto plot and the best setting as a profile
(llmstack.report.capacity).
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
    refused: bool = False  # the error is validation's (a ConfigError): in a settings search, pruned
    capacity: bool | None = None  # benchmark=capacity (None: the job did not compose)
    devices: int | None = None  # EngineConfig.devices_needed(), once resolved


@dataclass
class JobCheck:
    error: str | None = None
    refused: bool = False
    capacity: bool | None = None
    devices: int | None = None


@dataclass
class SweepPlan:
    directory: Path
    dry_run: bool
    jobs: list[PlannedJob]
    started_at: float = field(default_factory=time.time)

    @property
    def search(self) -> bool:
        """A server-settings search: every job that composes is a capacity search."""
        kinds = {job.capacity for job in self.jobs} - {None}
        return kinds == {True}

    @property
    def pruned(self) -> list[PlannedJob]:
        """A search's settings that validation refused: left out, not failed (none while nothing else runs:
        then the command itself is wrong)."""
        if not self.search or not self.runnable:
            return []
        return [job for job in self.jobs if job.error is not None and job.refused]

    @property
    def invalid(self) -> list[PlannedJob]:
        pruned = {id(job) for job in self.pruned}
        return [job for job in self.jobs if job.error is not None and id(job) not in pruned]

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
    planned = []
    for overrides in jobs:
        checked = check_job(overrides, compose, host_checks)
        planned.append(PlannedJob(overrides, job_dir_name(overrides), checked.error, checked.refused,
                                  checked.capacity, checked.devices))  # fmt: skip
    return SweepPlan(grid_directory(config, jobs), dry_run, planned)


def check_job(
    overrides: list[str], compose: Callable[[list[str]], DictConfig], host_checks: bool
) -> JobCheck:
    """Why this job cannot run (one paragraph; refused: by validation), whether it is a capacity search, the
    devices it uses. Starts nothing, writes nothing, prints nothing."""
    from hydra.errors import HydraException

    from llmstack.config import CONFIG_DIR
    from llmstack.config.resolve import resolve, to_run_config
    from llmstack.engines import get_engine
    from llmstack.errors import LlmstackError, describe_unexpected
    from llmstack.validation import validate

    check = JobCheck()
    try:
        cfg = _task_config(compose(list(overrides)))
        check.capacity = OmegaConf.select(cfg, "benchmark.phase", default=None) == "capacity"
        run = resolve(to_run_config(cfg), CONFIG_DIR)
        check.devices = run.engine.devices_needed()
        validate(run, CONFIG_DIR, host_checks=host_checks)
        get_engine(run.engine.name).plan(run)
    except LlmstackError as exc:
        check.error, check.refused = str(exc), True
    except HydraException as exc:
        from llmstack.config.hydra_errors import describe

        error = describe(exc, overrides, CONFIG_DIR)
        check.error = str(error) if error is not None else " ".join(str(exc).split())
    except Exception as exc:  # a job that would fail the same way when it ran
        check.error = describe_unexpected(exc)
    return check


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
    for job in plan.pruned:
        shown = " ".join(mask_override(o) for o in job.overrides)
        error = scrub(str(job.error), secret_values(job.overrides))
        print(f"llmstack: grid job {shown}: pruned, never launched: {error}", file=sys.stderr)
    if plan.pruned:
        print(f"llmstack: {len(plan.pruned)} of {len(plan.jobs)} settings pruned before the search (refused "
              f"by validation); {len(plan.runnable)} to search", file=sys.stderr)  # fmt: skip
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
    jobs = [
        {"name": job.name, "overrides": [mask_override(o) for o in job.overrides], "devices": job.devices}
        for job in plan.jobs
    ]
    listing: dict[str, object] = {"jobs": jobs, "varied": varied_keys([job.overrides for job in plan.jobs])}
    if plan.search:
        secrets = {job.name: secret_values(job.overrides) for job in plan.pruned}
        listing["search"] = "capacity"
        listing["pruned"] = {job.name: scrub(str(job.error), secrets[job.name]) for job in plan.pruned}
    write_text_atomic(plan.directory / "grid.json", json.dumps(listing, indent=2) + "\n")
    invalid = {id(job) for job in plan.invalid}  # pruned settings get nothing: they never start
    for index, job in enumerate(plan.jobs):
        if id(job) in invalid:
            job_dir = plan.directory / job.name
            write_failure(job_dir, GridJob(job.name, job.overrides, index, plan.directory), "validate",
                          InvalidJob(job.error))  # fmt: skip
    return True


def finish(plan: SweepPlan) -> None:
    """The report of exactly this grid's jobs, and the exit status: SOME_JOBS_FAILED with the count."""
    global last_status
    failed_jobs = [] if plan.dry_run else [job for job in plan.runnable if _failed_now(plan, job)]
    # A search's setting refused by its own validation (where the plan could not tell yet: the model's
    # shape unknown before the first job generated it) is pruned too: it never launched.
    refused = [job for job in failed_jobs if plan.search and refused_at_start(plan.directory / job.name)]
    if refused:
        print(f"llmstack: {len(refused)} more settings pruned at their start (refused by validation, never "
              "launched)", file=sys.stderr)  # fmt: skip
    failed = len(plan.invalid) + len(failed_jobs) - len(refused)
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
    if plan.search:
        from llmstack.report.capacity import announce

        announce(plan.directory)
    logger.info("grid done: %d of %d jobs failed; report: %s", failed, len(plan.jobs),
                ", ".join(str(p) for p in written))  # fmt: skip


def refused_at_start(job_dir: Path) -> bool:
    """The job's failure.json says its config was refused before anything started."""
    try:
        failure = json.loads((job_dir / "failure.json").read_text())
    except (OSError, ValueError):
        return False
    return failure.get("phase") == "validate" and failure.get("error_type") == "ConfigError"


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
