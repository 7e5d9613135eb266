"""Engines turn a valid RunConfig into a LaunchPlan. They never start processes.

Each engine module holds its planner and, beside it, its config schema (a subclass of
`llmstack.config.schema.EngineConfig`) that its YAMLs in configs/engine/ start from. Both tables below are
imported on first use, so a run loads only the engine it picked.
"""

from __future__ import annotations

from llmstack.config.schema import EngineConfig
from llmstack.engines.base import Engine
from llmstack.errors import ConfigError
from llmstack.lazy_registry import LazyRegistry

_ENGINES: LazyRegistry[type[Engine]] = LazyRegistry(
    {
        "vllm": "llmstack.engines.vllm:VllmEngine",
        "lightweight": "llmstack.engines.lightweight:LightweightEngine",
        "external": "llmstack.engines.external:ExternalEngine",
        "pp": "llmstack.engines.pp:PipelineEngine",
        "fastchat": "llmstack.engines.fastchat:FastChatEngine",
    }
)
# engine.name -> its schema; the engine group's YAMLs start from these.
ENGINE_SCHEMAS: LazyRegistry[type[EngineConfig]] = LazyRegistry(
    {
        "vllm": "llmstack.engines.vllm.config:VllmEngineConfig",
        "lightweight": "llmstack.engines.lightweight:LightweightEngineConfig",
        "external": "llmstack.engines.external:ExternalEngineConfig",
        "pp": "llmstack.engines.pp:PipelineEngineConfig",
        "fastchat": "llmstack.engines.fastchat:FastChatEngineConfig",
    }
)


def get_engine(name: str) -> Engine:
    if name not in _ENGINES:
        raise ConfigError("engine.name", name, "is not a known engine.", _ENGINES.names())
    return _ENGINES[name]()
