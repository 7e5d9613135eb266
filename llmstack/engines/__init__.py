"""Engines turn a valid RunConfig into a LaunchPlan. They never start processes."""

from __future__ import annotations

from llmstack.engines.base import Engine
from llmstack.errors import ConfigError


def get_engine(name: str) -> Engine:
    engines = _registry()
    if name not in engines:
        raise ConfigError("engine.name", name, "is not a known engine.", sorted(engines))
    return engines[name]


def _registry() -> dict[str, Engine]:
    from llmstack.engines.lightweight import LightweightEngine
    from llmstack.engines.vllm import VllmEngine

    return {"vllm": VllmEngine(), "lightweight": LightweightEngine()}
