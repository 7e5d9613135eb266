"""Engines turn a valid RunConfig into a LaunchPlan. They never start processes.

Each engine module holds its planner and, beside it, its config schema (a subclass of
`llmstack.config.schema.EngineConfig`) that its YAMLs in configs/engine/ start from.
"""

from __future__ import annotations

from llmstack.config.schema import EngineConfig
from llmstack.engines.base import Engine
from llmstack.engines.lightweight import LightweightEngine, LightweightEngineConfig
from llmstack.engines.vllm import VllmEngine
from llmstack.engines.vllm.config import VllmEngineConfig
from llmstack.errors import ConfigError

_ENGINES: dict[str, Engine] = {"vllm": VllmEngine(), "lightweight": LightweightEngine()}
# engine.name -> its schema; the engine group's YAMLs start from these.
ENGINE_SCHEMAS: dict[str, type[EngineConfig]] = {
    "vllm": VllmEngineConfig,
    "lightweight": LightweightEngineConfig,
}


def get_engine(name: str) -> Engine:
    if name not in _ENGINES:
        raise ConfigError("engine.name", name, "is not a known engine.", sorted(_ENGINES))
    return _ENGINES[name]
