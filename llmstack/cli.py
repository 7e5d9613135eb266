"""Command-line entry: `python -m llmstack [overrides...]`, Hydra's syntax, plus llmstack's error handling."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING

from llmstack.config import CONFIG_DIR
from llmstack.errors import Interrupted, LlmstackError, describe_unexpected
from llmstack.logs import scrubbed

if TYPE_CHECKING:
    from omegaconf import DictConfig

logger = logging.getLogger(__name__)


# Hydra reports its own composition errors (unknown group option, unknown key, bad type) with exit status 1.
# We turn those into 2, the status of every config error, but only if the task never started.
_task_started = False


def _full_error() -> bool:
    return os.environ.get("LLMSTACK_FULL_ERROR", "") not in ("", "0")


def run_task(cfg: DictConfig) -> int:
    """Run one composed config; the exit status (README, "Exit status")."""
    from llmstack import grid, interrupts
    from llmstack.config.secrets import secret_values
    from llmstack.logs import hide_secrets, setup_console_logging
    from llmstack.run import run

    hide_secrets(secret_values(sys.argv[1:]))
    with contextlib.suppress(Exception):  # a config that does not compose fails below, with its message
        hide_secrets(_configured_secrets(cfg))
    setup_console_logging()
    interrupts.capture()
    tolerate_closed_stdout()
    try:
        interrupts.check()  # a signal during composition
        job = grid.current_job()
        if job is None:
            run(cfg, CONFIG_DIR)
        else:
            grid.run_grid_job(cfg, CONFIG_DIR, job)
    except Interrupted as exc:
        print(f"llmstack: {exc}", file=sys.stderr)
        return exc.exit_code
    except LlmstackError as exc:
        if _full_error():
            traceback.print_exc()
        print(scrubbed(f"llmstack: {exc}"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("llmstack: interrupted by SIGINT", file=sys.stderr)
        return 130
    except Exception as exc:
        if _full_error():
            traceback.print_exc()
        notes = [n for n in getattr(exc, "__notes__", ()) if n.startswith("llmstack: ")]
        hint = "" if _full_error() else " (LLMSTACK_FULL_ERROR=1 shows the traceback)"
        print(scrubbed(notes[0] if notes else f"llmstack: {describe_unexpected(exc)}{hint}"), file=sys.stderr)
        return 1
    return 0


def _configured_secrets(cfg: DictConfig) -> list[str]:
    """Secret values the composed config holds (a profile's or the user's YAML may set them too)."""
    from omegaconf import OmegaConf

    from llmstack.config.secrets import SECRET_KEYS

    engine = OmegaConf.to_container(cfg.engine, resolve=True) if "engine" in cfg else {}
    return [str(v) for k, v in engine.items() if k in SECRET_KEYS and v]  # type: ignore[union-attr]


def tolerate_closed_stdout() -> None:
    """`llmstack ... | head -2`: once the reader has gone, what is printed is dropped and the run goes on
    (its results are in files); Python's default would end the run with BrokenPipeError."""
    if not isinstance(sys.stdout, _DroppingWhenClosed):
        sys.stdout = _DroppingWhenClosed(sys.stdout)


class _DroppingWhenClosed:
    def __init__(self, stream: object) -> None:
        self._stream = stream
        self._closed = False

    def write(self, text: str) -> int:
        if not self._closed:
            try:
                return self._stream.write(text)  # type: ignore[attr-defined]
            except (BrokenPipeError, ValueError):
                self._gone()
        return len(text)

    def flush(self) -> None:
        if not self._closed:
            try:
                self._stream.flush()  # type: ignore[attr-defined]
            except (BrokenPipeError, ValueError):
                self._gone()

    def _gone(self) -> None:
        self._closed = True
        # Python flushes stdout once more at exit, into the same broken pipe: point the descriptor at
        # /dev/null so that it finds nothing to complain about.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # type: ignore[attr-defined]
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def _hydra_task(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    from llmstack.config import compose_cache

    compose_cache.store(CONFIG_DIR, sys.argv[1:], cfg)
    with _without_hydra_full_error():  # the engines llmstack starts get the user's environment
        code = run_task(cfg)
    if code:
        raise SystemExit(code)


# Set while Hydra composes, so that Hydra's run_and_report raises its errors instead of printing them: the
# CLI says them in one paragraph (llmstack/config/hydra_errors.py).
_HYDRA_RAISES = "HYDRA_FULL_ERROR"
_hydra_raises_set_by_us = False


@contextlib.contextmanager
def _without_hydra_full_error() -> Iterator[None]:
    if not _hydra_raises_set_by_us:
        yield
        return
    os.environ.pop(_HYDRA_RAISES, None)
    try:
        yield
    finally:
        os.environ[_HYDRA_RAISES] = "1"


def _report_hydra_error(exc: Exception) -> int:
    from llmstack.config.hydra_errors import describe

    if _full_error():
        traceback.print_exc()
    if isinstance(exc, LlmstackError):  # raised by our sweeper or callbacks, outside any job
        print(scrubbed(f"llmstack: {exc}"), file=sys.stderr)
        return exc.exit_code
    error = describe(exc, sys.argv[1:], CONFIG_DIR)
    if error is not None:
        print(scrubbed(f"llmstack: {error}"), file=sys.stderr)
        return error.exit_code if not _task_started else 1
    from hydra.errors import HydraException

    hint = "" if _full_error() else " (LLMSTACK_FULL_ERROR=1 shows Hydra's full message)"
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if not isinstance(exc, HydraException):
        text = describe_unexpected(exc)
    print(scrubbed(f"llmstack: {text}{hint}"), file=sys.stderr)
    return 2 if isinstance(exc, HydraException) and not _task_started else 1


# `benchmark.concurrency=4` means one load level: the list [4] (a grid's sweeper does the same for sweeps).
_SCALAR_LOAD_LEVEL = re.compile(r"^(\+?benchmark\.(?:concurrency|request_rate))=([^\[\],]+)$")


def main() -> int:
    from llmstack.config import compose_cache, register_resolvers

    register_resolvers()
    sys.argv[1:] = [_SCALAR_LOAD_LEVEL.sub(r"\1=[\2]", arg) for arg in sys.argv[1:]]
    cached = compose_cache.load(CONFIG_DIR, sys.argv[1:])
    if cached is not None:
        return run_task(cached)
    return _main_through_hydra()


def _main_through_hydra() -> int:
    global _task_started
    _task_started = False
    import hydra

    from llmstack.config.store import register_schemas

    register_schemas()
    from llmstack.validation.profile_engine import profile_engine_conflict

    conflict = profile_engine_conflict(CONFIG_DIR, sys.argv[1:])
    if conflict is not None:
        print(f"llmstack: {conflict}", file=sys.stderr)
        return conflict.exit_code
    global _hydra_raises_set_by_us
    _hydra_raises_set_by_us = _HYDRA_RAISES not in os.environ
    os.environ.setdefault(_HYDRA_RAISES, "1")
    entry = hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(_hydra_task)
    from llmstack import grid_sweep

    grid_sweep.last_status = None
    try:
        entry()
    except SystemExit as exc:
        if exc.code == 1 and not _task_started:
            return 2
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:
        return _report_hydra_error(exc)
    finally:
        if _hydra_raises_set_by_us:
            os.environ.pop(_HYDRA_RAISES, None)
    return grid_sweep.last_status or 0  # a grid's (it has printed why): 2 invalid jobs, 5 failed ones
