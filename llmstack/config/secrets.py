"""Secrets (API keys) never reach disk, logs or printed plans: wherever a run records them, they read ***.

A key is secret by its name (`api_key` in any group). Besides the resolved config, the command line holds
them (a grid's overrides, Hydra's multirun.yaml, job names), and so may any text that quotes the
command line; `scrub` removes known secret values from such text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

SECRET_KEYS = frozenset({"api_key"})
MASK = "***"


def masked_config(run: object) -> DictConfig:
    """The run config (a RunConfig) with every secret shown as ***."""
    data = OmegaConf.to_container(OmegaConf.structured(run), resolve=True)
    return OmegaConf.create(_masked(data))


def _masked(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (MASK if k in SECRET_KEYS and v is not None else _masked(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_masked(v) for v in node]
    return node


def is_secret_override(override: str) -> bool:
    """`engine.api_key=...`, `+engine.api_key=...`: an override that sets a secret."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.rsplit(".", 1)[-1] in SECRET_KEYS


def mask_override(override: str) -> str:
    if is_secret_override(override) and "=" in override:
        return override.split("=", 1)[0] + "=" + MASK
    return override


def secret_values(overrides: Iterable[str] = (), run: object | None = None) -> list[str]:
    """The secret values a text may quote: from overrides and from a resolved config."""
    values = [o.split("=", 1)[1] for o in overrides if is_secret_override(o) and "=" in o]
    if run is not None:
        values += _values_of(OmegaConf.to_container(OmegaConf.structured(run), resolve=True))
    return sorted({v for v in values if v and v != MASK}, key=len, reverse=True)


def _values_of(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = []
        for k, v in node.items():
            if k in SECRET_KEYS and isinstance(v, str):
                found.append(v)
            else:
                found += _values_of(v)
        return found
    if isinstance(node, list):
        return [x for v in node for x in _values_of(v)]
    return []


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def masked_sweep_config(config: DictConfig) -> DictConfig:
    """A grid's whole config (Hydra's node included) with every secret shown as ***: what multirun.yaml
    holds. Interpolations stay unresolved."""
    overrides = list(config.hydra.overrides.task) if "hydra" in config else []
    secrets = secret_values(overrides)
    data = OmegaConf.to_container(config, resolve=False)
    return OmegaConf.create(_scrubbed(_masked(data), secrets))


def _scrubbed(node: Any, secrets: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _scrubbed(v, secrets) for k, v in node.items()}
    if isinstance(node, list):
        return [_scrubbed(v, secrets) for v in node]
    if isinstance(node, str) and secrets:
        return scrub(node, secrets)
    return node
