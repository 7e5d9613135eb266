"""One run, end to end: resolve, validate, plan, then (unless dry_run) serve, benchmark, record, tear down."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llmstack import interrupts
from llmstack.config.resolve import planned_devices, resolve, to_run_config
from llmstack.config.schema import EngineConfig, RunConfig
from llmstack.engines import get_engine
from llmstack.errors import Interrupted, LlmstackError, ResultsError, describe_unexpected
from llmstack.results.rundir import RunDir
from llmstack.serving.plan import LaunchPlan
from llmstack.validation import validate

logger = logging.getLogger(__name__)


def run(cfg: DictConfig, config_dir: Path) -> dict[str, Any] | None:
    """Returns the run's summary, or None for a dry run. (A grid's jobs go through llmstack.grid.)"""
    resolved, plan = prepare(cfg, config_dir)
    if resolved.dry_run:
        return None
    return Session(resolved, plan).execute()


def prepare(cfg: DictConfig, config_dir: Path) -> tuple[RunConfig, LaunchPlan]:
    """Resolve, validate and plan; prints the plan of a dry run. Starts nothing."""
    requested = to_run_config(cfg)
    resolved = resolve(requested, config_dir)
    validate(resolved, config_dir, host_checks=not resolved.dry_run)
    if picked := {key: free_port(resolved.engine.host) for key in _free_port_keys(resolved.engine)}:
        resolved = dataclasses.replace(resolved, engine=dataclasses.replace(resolved.engine, **picked))
    plan = get_engine(resolved.engine.name).plan(resolved)
    if resolved.dry_run:
        print(render_dry_run(resolved, plan))
    return resolved, plan


class Session:
    """The live part of a run. Everything it starts is stopped before execute() returns or raises.

    summary.json says what happened, whatever happened: it is written when the run starts (status
    "running"), at every phase and after every load level, and at the end with the outcome: "ok",
    "failed" (with the error and the exit status) or "interrupted" (with the signal and the phase it
    landed in). A launcher killed outright leaves the last of these, with its pid.
    """

    def __init__(self, run: RunConfig, plan: LaunchPlan, rundir: RunDir | None = None) -> None:
        self.run = run
        self.plan = plan
        self.rundir = rundir or RunDir.create(run.results_dir, run.experiment_name, run.run_name)
        self.summary: dict[str, Any] = {
            "status": "running",
            "phase": "setup",
            "run_dir": str(self.rundir.path),
            "engine": plan.engine,
            "model": run.model.name,
            "low_bit": run.low_bit.name,
            "device": run.device.name,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "launcher_pid": os.getpid(),
        }
        self._save_error: str | None = None
        # engine=external: what the server said about itself (llmstack.serving.external), for the records.
        self.external: dict[str, Any] | None = None

    def execute(self) -> dict[str, Any]:
        from llmstack.logs import add_file_logging, file_only_logger
        from llmstack.progress import closing_line

        handler = add_file_logging(self.rundir.file("llmstack.log"))
        logger.info("run directory: %s", self.rundir.path)
        self._save()
        try:
            self._run()
            interrupts.check()  # a signal that landed during teardown
            self._outcome("ok", 0)
        except Interrupted as exc:
            self._outcome("interrupted", exc.exit_code, signal=exc.signal_name)
            raise
        except KeyboardInterrupt:  # where signals raise (llmstack embedded, not through its CLI)
            self._outcome("interrupted", 130, signal="SIGINT")
            raise
        except LlmstackError as exc:
            self._outcome("failed", exc.exit_code, error=str(exc) or type(exc).__name__)
            raise
        except BaseException as exc:
            file_only_logger(handler).error("internal error", exc_info=True)
            text = describe_unexpected(exc)
            self._outcome("failed", 1, error=text, error_type=type(exc).__name__)
            exc.add_note(f"llmstack: {text}; the traceback is in {self.rundir.file('llmstack.log')}")
            raise
        finally:
            self._record_doctor()
            if self.summary["status"] == "ok" and interrupts.requested():
                self.summary["phase"] = "recording"
                self._outcome("interrupted", interrupts.interrupted().exit_code,
                              signal=interrupts.interrupted().signal_name)  # fmt: skip
            self.summary["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._save()
            # At the end, where it is seen: the start's line has scrolled away by now.
            logger.info("%s", closing_line(self.summary))
            logging.getLogger().removeHandler(handler)
            handler.close()
        interrupts.check()  # a signal that landed while the run was being recorded
        if self._save_error is not None:
            raise ResultsError(f"the run's summary could not be written: {self._save_error}")
        return self.summary

    def _run(self) -> None:
        from llmstack.phases.registry import needs_server
        from llmstack.serving.group import supervise

        self._enter("model")
        self._prepare_model()
        if not needs_server(self.run.benchmark.phase):
            self._record_inputs()
            phase = self._prepare_benchmark()
            self._enter("benchmark")
            phase.run(None)  # offline: the phase runs the engine itself
            return
        if self.plan.external:
            self._run_external()
            return
        self._enter("startup")
        echo = _engine_echo if self.run.show_engine_log else _engine_echo_problems
        with supervise(self.plan, self.rundir.file, echo=echo) as server:
            self.summary["engine_pid"] = server.pid  # its session id: every process of it is in that session
            # The engine takes many seconds to load: record and build prompts meanwhile, not before (a bad
            # dataset still fails within seconds, and the engine is stopped).
            self._record_inputs()
            phase = self._prepare_benchmark()
            self._enter("startup")
            self.summary["ready_s"] = round(server.wait_ready(), 3)
            if self.plan.members:  # a session each, started one after another
                self.summary["engine_pids"] = server.pids
            if phase is None:
                self._enter("serving")
                logger.info(
                    "serving %s at %s/v1 — Ctrl-C to stop",
                    self.plan.probe.served_name,
                    self.plan.probe.base_url,
                )
                server.wait()
                return
            server.echo = _engine_echo_problems  # keep the benchmark output readable
            self._enter("benchmark")
            phase.run(server)
            server.check_healthy("at the end of the benchmark")
            self._enter("teardown")

    def _run_external(self) -> None:
        """engine=external: wait until the server answers, settle what only it can tell (served name,
        context), then benchmark it as a launched one. Nothing is started or stopped."""
        from llmstack.engines.external import adopt_endpoint
        from llmstack.phases.registry import benchmark_problems
        from llmstack.serving.external import ExternalServer

        self._enter("startup")
        with ExternalServer(self.plan) as server:
            self.summary["ready_s"] = round(server.wait_ready(), 3)
            self.external = server.facts
            self.run, self.plan = adopt_endpoint(self.run, self.plan, server.models)
            self.summary.update(model=self.run.model.name, external=self.external)
            for error in benchmark_problems(self.run):  # now with the context the server reported
                raise error
            self._record_inputs()
            phase = self._prepare_benchmark()
            self._enter("benchmark")
            phase.run(server)
            server.check_healthy("at the end of the benchmark")
            self._enter("teardown")

    def _enter(self, phase: str) -> None:
        """A phase boundary: recorded on disk, and a place where a stop signal ends the run."""
        self.summary["phase"] = phase
        self._save()
        interrupts.check()

    def _outcome(self, status: str, exit_code: int, **details: Any) -> None:
        self.summary["status"] = status
        self.summary["exit_code"] = exit_code
        for key in ("signal", "error", "error_type"):
            self.summary.pop(key, None)
        self.summary.update(details)

    def _save(self) -> None:
        """summary.json as it stands; a failure to write it is remembered (and fails the run), not raised
        here: it must not hide the run's own outcome."""
        try:
            self.rundir.write_json("summary.json", self.summary)
        except (OSError, ResultsError) as exc:
            if self._save_error is None:
                logger.error("cannot write %s: %s", self.rundir.file("summary.json"), exc)
            self._save_error = str(exc)

    def _prepare_benchmark(self) -> Any:
        """The benchmark phase with its prompts built, before anything starts (a bad dataset fails here)."""
        from llmstack.phases.registry import prepare_phase

        if self.run.benchmark.phase == "none":
            return None
        self._enter("benchmark-setup")
        self.summary["benchmark"] = {}
        return prepare_phase(
            self.run, self.plan, self.rundir, self.summary["benchmark"], save=self._save, enter=self._enter
        )

    def _prepare_model(self) -> None:
        if self.run.model.generator == "tiny":
            from llmstack.models.tiny import ensure_tiny_model

            path = ensure_tiny_model()
            if str(path) != self.run.model.path:
                raise LlmstackError(
                    f"tiny model generated at {path}, but the plan uses {self.run.model.path}"
                )

    def _record_inputs(self) -> None:
        from llmstack.config.secrets import masked_config

        self.rundir.write_text("config.yaml", OmegaConf.to_yaml(masked_config(self.run)))
        self.rundir.write_json("plan.json", self.plan.to_dict())
        self.rundir.write_text("command.sh", "#!/usr/bin/env bash\n" + self.plan.shell_command() + "\n")
        environment = describe_environment(self.plan)
        if self.external is not None:
            environment["external_server"] = self.external
        self.rundir.write_json("environment.json", environment)

    def _record_doctor(self) -> None:
        """Devices, drivers and the engine interpreter's packages, after the run: never competing with the
        engine's startup or the benchmark for the CPU (the quick report imports no torch; about a second)."""
        from llmstack import doctor

        pythons = list(dict.fromkeys([self.plan.interpreter, sys.executable]))
        doctor.write_report(self.rundir.file("doctor.json"), pythons)  # never raises


def render_dry_run(run: RunConfig, plan: LaunchPlan) -> str:
    from llmstack.phases.registry import needs_server

    if plan.external:
        from llmstack.engines.external import describe_dry_run

        return describe_dry_run(run, plan)
    lines = [
        f"# llmstack dry run: {plan.engine}, model={run.model.name}, low_bit={run.low_bit.name}, "
        f"device={run.device.name} {planned_devices(run.device)}",
        "# Nothing was started. Host checks (port free, model path, interpreter) were skipped.",
        f"# Ready when {plan.probe.describe()}{_in_order(plan)}.",
        plan.shell_command(),
    ]
    if plan.node_argvs:
        lines += _other_nodes(plan)
    if not needs_server(run.benchmark.phase):
        lines.append(
            f"# benchmark={run.benchmark.name} starts no server: it runs `{plan.interpreter} -m "
            "llmstack.phases.offline_process` with the engine arguments above (not --host/--port) in-process."
        )
    if (memory := get_engine(run.engine.name).memory_summary(run)) is not None:
        lines.insert(3, f"# Memory estimate {memory}.")
    return "\n".join(lines)


def _in_order(plan: LaunchPlan) -> str:
    return f", its {len(plan.members)} processes started in order, each ready first" if plan.members else ""


def _other_nodes(plan: LaunchPlan) -> list[str]:
    """A multi-node plan's other commands: each node runs its own, with the environment above."""
    import dataclasses

    here = plan.node_argvs.index(plan.argv) if plan.argv in plan.node_argvs else 0
    lines = [
        f"# {len(plan.node_argvs)} nodes: the command above is node {here}'s (this machine's); on each other "
        "node run its own, with the same environment:"
    ]
    for rank, argv in enumerate(plan.node_argvs):
        if rank != here:
            lines += [f"# node {rank}:", dataclasses.replace(plan, argv=argv, env={}).shell_command()]
    return lines


def describe_environment(plan: LaunchPlan) -> dict[str, Any]:
    import platform

    import llmstack
    from llmstack.results.git_status import checked_provenance

    source = checked_provenance()  # also what every result.json of the run repeats
    return {
        "llmstack": llmstack.__version__,
        "llmstack_git_commit": source["git_commit"],
        "llmstack_git_dirty": source["git_dirty"],
        "launcher_python": sys.version.split()[0],
        "engine_python": None if plan.external else plan.interpreter,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": _cpu_count(),
    }


def _free_port_keys(engine: EngineConfig) -> list[str]:
    """The engine's port keys set to 0, for llmstack to fill."""
    return [key for key in engine.port_keys() if getattr(engine, key) == 0]


def free_port(host: str) -> int:
    """A free port, leased for this process's lifetime so parallel grid jobs on one host never share one."""
    import fcntl
    import tempfile

    leases = Path(tempfile.gettempdir()) / "llmstack-leases"
    leases.mkdir(exist_ok=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        lease = open(leases / f"port-{port}", "w")  # noqa: SIM115 (held open: the lock is the lease)
        try:
            fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lease.close()
            continue
        _PORT_LEASES.append(lease)
        return port
    raise LlmstackError(f"no free port on {host} after 100 tries")


_PORT_LEASES: list[Any] = []


def _cpu_count() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _engine_echo(line: str) -> None:
    from llmstack import progress

    progress.clear()
    print(f"  [engine] {line}", file=sys.stderr, flush=True)


_PROBLEM_MARKERS = ("ERROR", "CRITICAL", "Traceback", "Error:", "error:")
# FastChat logs whatever its processes write to stderr (uvicorn's INFO lines, warnings) as
# "<time> | ERROR | stderr | <line>": the line itself says whether it is a problem.
_STDERR_RELAY = "| ERROR | stderr | "


def _engine_echo_problems(line: str) -> None:
    said = line.partition(_STDERR_RELAY)[2] or line
    if any(marker in said for marker in _PROBLEM_MARKERS):
        _engine_echo(line)
