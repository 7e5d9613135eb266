"""The contract every engine module fulfils."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llmstack.config.schema import EngineConfig, LowBitConfig, RunConfig
from llmstack.errors import ConfigError
from llmstack.serving.plan import LaunchPlan, ReadyProbe

# Which environment variable picks the cards an engine sees, per device kind.
DEVICE_SELECTOR_ENV = {"cuda": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}

ServerEngineConfig = TypeVar("ServerEngineConfig", bound=EngineConfig)

# The checkout that holds this launcher: processes we start in another interpreter run the same code.
SOURCE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


def source_first_pythonpath(inherited: str) -> str:
    """PYTHONPATH for a process of ours in any interpreter: this checkout first, then what it inherits
    (packages installed with `pip --target`, site dirs)."""
    return SOURCE_ROOT + (os.pathsep + inherited if inherited else "")


def with_server_defaults(engine_cfg: ServerEngineConfig, run: RunConfig) -> ServerEngineConfig:
    """Fill what every OpenAI-server engine leaves to llmstack: interpreter, served name, context length and
    trust_remote_code, from the running interpreter and the model."""
    e = engine_cfg
    return dataclasses.replace(
        e,
        python=e.python or sys.executable,
        served_model_name=e.served_model_name or run.model.served_name,
        max_model_len=e.max_model_len or run.model.max_model_len,
        trust_remote_code=run.model.trust_remote_code if e.trust_remote_code is None else e.trust_remote_code,
    )


def device_and_key_env(run: RunConfig, api_key_env: str) -> dict[str, str]:
    """What every server engine's environment gets: the cards it may see (device.ids), the API key (through
    the environment, so it does not show in `ps`), then device.env and engine.extra_env, which win."""
    env: dict[str, str] = {}
    selector = DEVICE_SELECTOR_ENV.get(run.device.name)
    if selector and run.device.ids is not None:
        env[selector] = ",".join(str(i) for i in run.device.ids)
    if run.engine.api_key:
        env[api_key_env] = run.engine.api_key
    env.update(run.device.env)
    env.update(run.engine.extra_env)
    return env


def ready_probe(e: EngineConfig) -> ReadyProbe:
    """The readiness probe of a server engine: its own host (a wildcard bind probed on loopback) and port."""
    probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(e.host, e.host)
    if ":" in probe_host:
        probe_host = f"[{probe_host}]"
    return ReadyProbe(
        base_url=f"http://{probe_host}:{e.port}",
        served_name=str(e.served_model_name),
        api_key=e.api_key,
        timeout_s=e.startup_timeout_s,
    )


class Engine(Protocol):
    name: str
    # Whether the engine starts a server (or an offline process) here; false for engine=external, whose
    # server is already running elsewhere: host rules (port, model path, interpreter) do not apply.
    launches: bool

    def default_low_bit(self, engine_cfg: Any) -> str:
        """The low_bit option that `low_bit=auto` means for this engine."""
        ...

    def resolve(self, run: RunConfig) -> Any:
        """The engine config with every value the user left to llmstack filled in."""
        ...

    def low_bit_problem(self, run: RunConfig, low_bit: LowBitConfig) -> str | None:
        """Why this engine cannot run `low_bit` on run.device, or None if it can."""
        ...

    def check(self, run: RunConfig) -> list[ConfigError]:
        """Engine-specific rules on a resolved config."""
        ...

    def device_problems(
        self, run: RunConfig, low_bits: Callable[[], Sequence[LowBitConfig]]
    ) -> Iterator[ConfigError]:
        """Whether the run fits run.device: enough devices, and memory where the engine can tell (checked
        after the low_bit is known to run there); `low_bits()` lists the formats it could run instead (read
        only when needed)."""
        ...

    def memory_summary(self, run: RunConfig) -> str | None:
        """The memory estimate in one line (for command.sh), or None where the engine has none."""
        ...

    def required_module(self, run: RunConfig) -> str | tuple[str, ...]:
        """The top-level module(s) the engine's interpreter must be able to import."""
        ...

    def plan(self, run: RunConfig) -> LaunchPlan:
        """The exact process to start. Pure: reads nothing but `run`."""
        ...
