"""The contract every engine module fulfils."""

from __future__ import annotations

from typing import Any, Protocol

from llmstack.config.schema import LowBitConfig, RunConfig
from llmstack.engines.plan import LaunchPlan
from llmstack.errors import ConfigError


class Engine(Protocol):
    name: str

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

    def required_module(self, run: RunConfig) -> str:
        """A top-level module the engine's interpreter must be able to import."""
        ...

    def plan(self, run: RunConfig) -> LaunchPlan:
        """The exact process to start. Pure: reads nothing but `run`."""
        ...
