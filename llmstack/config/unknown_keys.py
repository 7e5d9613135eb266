"""Keys the chosen schemas do not have, however they got into the composed config.

Hydra refuses `engine.max_num_seq=64` when the key is not in the engine's schema, but `+engine.max_num_seq=64`
appends it with the struct flag lifted, and OmegaConf's `to_object` then sets it as a plain attribute that no
dataclass field carries: the run went on with the setting nowhere. Every node of the composed config that
is typed by a schema is checked against that schema's fields before anything else looks at it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Iterator
from typing import Any

from llmstack.errors import ConfigError


def unknown_key_error(cfg: Any) -> ConfigError | None:
    """The error for the first key of `cfg` (a composed DictConfig) that its schema does not have."""
    for path, key, node in _unknown_keys(cfg):
        full_key = f"{path}.{key}" if path else key
        value = node._get_node(key)
        return no_such_key(full_key, _shown(value), node._metadata.object_type, owner=_owner(cfg, path))
    return None


def no_such_key(full_key: str, value: object, schema: type, owner: str | None) -> ConfigError:
    """`engine.max_num_seq=64: engine=vllm has no such key. Did you mean engine.max_num_seqs? ...`"""
    parent, _, key = full_key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
    if not parent:  # `profil=cpu` is a misspelt group as often as a misspelt key
        fields = [*fields, *(g for g in _groups() if g not in fields)]
    where = owner or (f"{parent}" if parent else "the run config")
    reason = f"{where} has no such key."
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if close:
        reason = f"{where} has no such key; did you mean {prefix}{close[0]}?"
    elsewhere = _options_having(parent, key) if parent in ("engine", "benchmark") else []
    if elsewhere:
        reason += f" It is a key of {', '.join(f'{parent}={o}' for o in elsewhere)}."
    return ConfigError(full_key, value, reason, [prefix + f for f in fields])


def _unknown_keys(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    from omegaconf import DictConfig

    schema = node._metadata.object_type
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        if fields is not None and key not in fields:
            yield path, str(key), node
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from _unknown_keys(child, f"{path}.{key}" if path else str(key))


def _owner(cfg: Any, path: str) -> str | None:
    """How messages name the node: `engine=lightweight` for a group's node, else None."""
    if not path or "." in path:
        return None
    node = cfg.get(path, {})
    name, flavour = node.get("name"), node.get("flavour")
    # As EngineConfig.label() names an engine: vllm_ipex is engine=vllm (ipex).
    return None if not name else f"{path}={name}" + (f" ({flavour})" if flavour else "")


def _shown(node: Any) -> object:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node._value()
    except Exception:  # an unresolvable interpolation: show it as written
        return node


def _groups() -> list[str]:
    from llmstack.config import CONFIG_DIR
    from llmstack.config.groups import config_groups

    try:
        return config_groups(CONFIG_DIR).groups()
    except Exception:  # only a nicety of the message
        return []


def _options_having(group: str, key: str) -> list[str]:
    """The options of `group` whose schema has `key` (`max_num_seqs`: engine=vllm, vllm_ipex)."""
    from llmstack.config import CONFIG_DIR
    from llmstack.config.groups import config_groups

    try:
        groups = config_groups(CONFIG_DIR)
        return [o for o in groups.options(group) if key in _schema_fields(group, groups.schema(group, o))]
    except Exception:  # only a nicety of the message: never hide the error behind another
        return []


def _schema_fields(group: str, schema_name: str | None) -> Iterable[str]:
    if group == "engine":
        from llmstack.engines import ENGINE_SCHEMAS

        schema = ENGINE_SCHEMAS.get(str(schema_name))
    else:
        from llmstack.phases.registry import benchmark_schema

        schema = benchmark_schema(str(schema_name))
    return [f.name for f in dataclasses.fields(schema)] if schema is not None else []
