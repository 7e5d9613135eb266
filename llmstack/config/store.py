"""Registers the schemas in Hydra's ConfigStore, so every YAML in configs/ is typed."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from llmstack.config.schema import DeviceConfig, LowBitConfig, ModelConfig, RunConfig

# Each engine's schema lives beside its planner (llmstack/engines/), each phase's beside the phase
# (llmstack/phases/); the registries list them.
from llmstack.engines import ENGINE_SCHEMAS
from llmstack.phases.registry import benchmark_schemas


def register_schemas() -> None:
    """Everything Hydra needs before composing configs/: the typed schemas and our resolvers."""
    from llmstack.config import register_resolvers

    register_resolvers()
    cs = ConfigStore.instance()
    # Kept out of the user-facing groups, so `engine=` lists only real engines: each YAML pulls its
    # schema in with `- /schema/<group>/<name>@_here_`.
    cs.store(group="schema", name="run", node=RunConfig)
    for name, schema in ENGINE_SCHEMAS.items():
        cs.store(group="schema/engine", name=name, node=schema)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    cs.store(group="schema/low_bit", name="low_bit", node=LowBitConfig)
    cs.store(group="schema/device", name="device", node=DeviceConfig)
    for phase, schema in benchmark_schemas().items():
        cs.store(group="schema/benchmark", name=phase, node=schema)
