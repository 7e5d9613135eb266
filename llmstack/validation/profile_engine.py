"""A per-GPU profile combined with an engine it was not written for, caught before Hydra composes.

Profiles (configs/profile/*.yaml) pick their engine (`override /engine: vllm`) and set that engine's keys.
`profile=arc_a770 engine=lightweight` would otherwise fail inside Hydra's composition with a message about
`LightweightEngineConfig` that does not say the profile is the cause.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmstack.errors import ConfigError

_OVERRIDE_ENGINE = re.compile(r"^override\s+/engine$")
_SCHEMA = re.compile(r"^/schema/engine/(\w+)@_here_$")


def profile_engine_conflict(config_dir: Path, overrides: Sequence[str]) -> ConfigError | None:
    """The error for `profile=P engine=E` when P sets engine keys that E does not have, else None.

    Only plain single choices are checked; sweeps, unknown options and anything else are left to Hydra."""
    pairs = (o.split("=", 1) for o in overrides if "=" in o)
    chosen = {key: value for key, value in pairs if key in ("profile", "engine")}
    profile, engine = chosen.get("profile"), chosen.get("engine")
    if not profile or not engine or "," in profile or "," in engine:
        return None
    profile_doc = _load(config_dir / "profile" / f"{profile}.yaml")
    engine_schema = _engine_schema(config_dir, engine)
    if profile_doc is None or engine_schema is None:
        return None
    written_for = next(
        (value for item in profile_doc.get("defaults") or [] if isinstance(item, dict)
         for key, value in item.items() if _OVERRIDE_ENGINE.match(str(key))),
        None,
    )  # fmt: skip
    from llmstack.engines import ENGINE_SCHEMAS

    fields = {f.name for f in dataclasses.fields(ENGINE_SCHEMAS[engine_schema])}
    foreign = sorted(set(profile_doc.get("engine") or {}) - fields)
    if not foreign or written_for is None:
        return None
    profile_schema = _engine_schema(config_dir, str(written_for))
    siblings = sorted(
        p.stem
        for p in (config_dir / "engine").glob("*.yaml")
        if _engine_schema(config_dir, p.stem) == profile_schema
    )
    return ConfigError(
        "engine",
        engine,
        f"profile={profile} is written for engine={written_for} and sets "
        f"{', '.join('engine.' + k for k in foreign)}, which engine={engine} does not have.",
        choices=siblings,
        hint=f"Use profile={profile} with one of those engines, or drop profile= and set device= and the "
        f"engine's own keys on the command line.",
    )


def _engine_schema(config_dir: Path, engine: str) -> str | None:
    doc = _load(config_dir / "engine" / f"{engine}.yaml")
    if doc is None:
        return None
    for item in doc.get("defaults") or []:
        match = _SCHEMA.match(str(item)) if isinstance(item, str) else None
        if match:
            return match.group(1)
    return None


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    import yaml

    doc = yaml.safe_load(path.read_text())
    return doc if isinstance(doc, dict) else None
