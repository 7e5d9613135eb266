"""Grids (`python -m llmstack -m ...`): one job per point, named by its overrides, resumable, failure-safe.

Each job runs in <the grid's directory>/<its overrides>/ (llmstack.grid_sweep picks the directory and checks
every job before the first starts). A job whose summary.json says "ok" is skipped (resume for free;
`rerun=true` forces it). A job that fails (engine crash, benchmark error, an error of llmstack's own) writes
failure.json there and the grid goes on. At the end the grid's report covers exactly its jobs, and its exit
status says whether some failed (llmstack.grid_sweep.SOME_JOBS_FAILED). A stop signal (Ctrl-C, SIGTERM,
SIGHUP) is not a failure: the grid stops at once, the job's summary says "interrupted", the exit status is
the signal's (130, 143, 129), and the next run of the same grid resumes with that job. Secrets
(`engine.api_key=...`) are not part of job names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from llmstack.config.secrets import is_secret_override, mask_override, scrub, secret_values
from llmstack.errors import EngineError, Interrupted, describe_unexpected
from llmstack.results.rundir import RunDir

logger = logging.getLogger(__name__)

# Keys that do not change what a job measures, so they stay out of its directory name.
NOT_IDENTITY = frozenset({"experiment_name", "results_dir", "rerun", "dry_run", "show_engine_log"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+\-\[\]]")
_MAX_NAME = 160


@dataclass(frozen=True)
class GridJob:
    name: str
    overrides: list[str]
    index: int
    directory: Path  # the grid's: this job writes directory/name/


def current_job() -> GridJob | None:
    """The grid job this process is running, or None outside a multirun."""
    if "hydra.core.hydra_config" not in sys.modules:
        return None  # Hydra never ran in this process (the compose cache's fast path): not a grid
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    overrides = list(hydra_cfg.overrides.task)
    return GridJob(job_dir_name(overrides), overrides, int(hydra_cfg.job.num), Path(str(hydra_cfg.sweep.dir)))


def job_dir_name(overrides: list[str]) -> str:
    """A stable, filesystem-safe directory name from a job's overrides (identity keys only).

    Group choices (`low_bit=bf16`) come first, then keys (`engine.max_num_seqs=8`), each sorted, so that a
    name cut short (with a hash to stay unique) still shows what matters most.
    """
    kept = [
        o
        for o in overrides
        if o.split("=", 1)[0].lstrip("+~") not in NOT_IDENTITY and not is_secret_override(o)
    ]
    kept.sort(key=lambda o: ("." in o.split("=", 1)[0], o.lstrip("+~")))
    name = _UNSAFE.sub("_", ",".join(kept)) or "default"
    if len(name) > _MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"{name[: _MAX_NAME - 13]}-{digest}"
    return name


def job_is_done(job_dir: Path) -> bool:
    try:
        return json.loads((job_dir / "summary.json").read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def run_grid_job(cfg: DictConfig, config_dir: Path, job: GridJob) -> dict[str, Any]:
    """Run one job; never raises for a failed job (the grid must go on), only for a stop signal."""
    from llmstack.run import Session, prepare

    if cfg.get("dry_run", False):
        return _dry_run_job(cfg, config_dir, job)
    job_dir = job.directory / job.name
    if job_is_done(job_dir) and not cfg.get("rerun", False):
        logger.info("job %d %s: done before, skipped (rerun=true runs it again)", job.index, job.name)
        return {"status": "skipped", "run_dir": str(job_dir)}
    if job_dir.exists():
        shutil.rmtree(job_dir)  # a failed, interrupted or forced job starts clean
    logger.info("job %d: %s", job.index, job.name)
    phase = "validate"
    session: Session | None = None
    try:
        run, plan = prepare(cfg, config_dir)
        session = Session(run, plan, rundir=RunDir.exact(job_dir))
        phase = "run"
        return session.execute()
    except Interrupted:
        logger.warning("grid stopped in job %d (%s); the next run resumes with it", job.index, job.name)
        raise
    except Exception as exc:
        if session is not None:
            phase = str(session.summary.get("phase", phase))
        write_failure(job_dir, job, phase, exc)
        message = str(exc) if hasattr(exc, "exit_code") else describe_unexpected(exc)
        logger.error("job %d failed in %s: %s", job.index, phase, message.splitlines()[0])
        return {"status": "failed", "phase": phase, "error": message}


def _dry_run_job(cfg: DictConfig, config_dir: Path, job: GridJob) -> dict[str, Any]:
    """The job's plan printed, or its error; like a dry run, it writes nothing."""
    from llmstack.errors import LlmstackError
    from llmstack.run import prepare

    logger.info("job %d: %s (dry run)", job.index, job.name)
    try:
        prepare(cfg, config_dir)
    except LlmstackError as exc:
        logger.error("job %d is invalid: %s", job.index, exc)
        return {"status": "failed", "phase": "validate", "error": str(exc)}
    return {"status": "dry_run"}


def write_failure(job_dir: Path, job: GridJob, phase: str, exc: Exception) -> None:
    secrets = secret_values(job.overrides)
    known = hasattr(exc, "exit_code")  # one of llmstack's own errors
    error = str(exc).split("\nLast lines of the engine log:")[0] if known else describe_unexpected(exc)
    tail = [scrub(line, secrets) for line in exc.log_tail] if isinstance(exc, EngineError) else []
    rundir = RunDir.exact(job_dir)
    rundir.write_json(
        "failure.json",
        {
            "job": job.name,
            "overrides": [mask_override(o) for o in job.overrides],
            "phase": phase,
            "error_type": type(exc).__name__,
            "error": scrub(error, secrets),
            "exit_code": getattr(exc, "exit_code", 1),
            "log_tail": tail,
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
