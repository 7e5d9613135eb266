"""A per-GPU profile combined with an engine it was not written for, caught before Hydra composes.

Profiles (configs/profile/*.yaml) pick their engine (`override /engine: vllm`) and set that engine's keys.
`profile=arc_a770 engine=lightweight` would otherwise fail inside Hydra's composition with a message about
`LightweightEngineConfig` that does not say the profile is the cause.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from llmstack.errors import ConfigError


def profile_engine_conflict(config_dir: Path, overrides: Sequence[str]) -> ConfigError | None:
    """The error for `profile=P engine=E` when P sets engine keys that E does not have, else None.

    Only plain single choices are checked; sweeps, unknown options and anything else are left to Hydra."""
    pairs = (o.split("=", 1) for o in overrides if "=" in o)
    chosen = {key: value for key, value in pairs if key in ("profile", "engine")}
    profile, engine = chosen.get("profile"), chosen.get("engine")
    if not profile or not engine or "," in profile or "," in engine:
        return None
    from llmstack.config.groups import config_groups
    from llmstack.engines import ENGINE_SCHEMAS

    groups = config_groups(Path(config_dir))
    profile_values = groups.config("profile", profile)
    engine_schema = groups.schema("engine", engine)
    if profile_values is None or engine_schema not in ENGINE_SCHEMAS:
        return None
    written_for = groups.picks("profile", profile, "engine")
    fields = {f.name for f in dataclasses.fields(ENGINE_SCHEMAS[engine_schema])}
    foreign = sorted(set(profile_values.get("engine") or {}) - fields)
    if not foreign or written_for is None:
        return None
    profile_schema = groups.schema("engine", written_for)
    siblings = [
        option
        for option in groups.options("engine")
        if groups.schema("engine", option) == profile_schema and _fits(config_dir, profile, option)
    ]
    return ConfigError(
        "engine",
        engine,
        f"profile={profile} is written for engine={written_for} and sets "
        f"{', '.join('engine.' + k for k in foreign)}, which engine={engine} does not have.",
        choices=siblings,
        hint=f"Use profile={profile} with one of those engines, or drop profile= and set device= and the "
        f"engine's own keys on the command line.",
    )


def _fits(config_dir: Path, profile: str, engine: str) -> bool:
    """Whether `profile=P engine=E` passes every config rule: an engine with the profile's keys may still not
    run on its device (profile=cpu engine=vllm_ipex: the fork is for Intel GPUs), and the message must not
    offer it. Composed as a dry run: the profile's machine need not be this one."""
    from hydra import compose, initialize_config_dir

    from llmstack.config.resolve import resolve, to_run_config
    from llmstack.validation.rules import config_problems

    try:
        with initialize_config_dir(str(Path(config_dir).absolute()), version_base="1.3"):
            cfg = compose("config", overrides=[f"profile={profile}", f"engine={engine}", "dry_run=true"])
        run = resolve(to_run_config(cfg), Path(config_dir))
        return next(iter(config_problems(run, Path(config_dir))), None) is None
    except Exception:  # an option that does not even compose with the profile does not fit it
        return False
