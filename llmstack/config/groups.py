"""The options of a config group and what each option's defaults list picks, read through Hydra's own config
repository (the loader composition uses), so no YAML is parsed by hand and `pkg://` or extra search paths
would list the same way.

Hydra's repository is internal API (`hydra._internal`), stable over Hydra 1.x; it is used only where options
are listed (error messages, doctor, profile checks), never on the compose-cache fast path.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


class ConfigGroups:
    def __init__(self, config_dir: Path) -> None:
        from hydra._internal.config_repository import ConfigRepository
        from hydra._internal.utils import create_config_search_path

        from llmstack.config.store import register_schemas

        # Options start from the schemas in the ConfigStore; without them their defaults would not resolve.
        register_schemas()
        self._repo = ConfigRepository(create_config_search_path(f"file://{Path(config_dir).absolute()}"))

    def options(self, group: str) -> list[str]:
        """The group's options, `auto` (a placeholder resolved per engine) left out."""
        from hydra.core.object_type import ObjectType

        return [
            o for o in self._repo.get_group_options(group, results_filter=ObjectType.CONFIG) if o != "auto"
        ]

    def groups(self) -> list[str]:
        """The groups a command line picks from (`engine`, `profile`, ...); Hydra's and `schema` left out."""
        from hydra.core.object_type import ObjectType

        found = self._repo.get_group_options("", results_filter=ObjectType.GROUP)
        return [g for g in found if g not in ("hydra", "schema")]

    def default(self, group: str, primary: str = "config") -> str | None:
        """The option the primary config's defaults list picks for `group` (`engine: vllm`)."""
        loaded = self._repo.load_config(primary)
        for default in loaded.defaults_list if loaded is not None else []:
            if getattr(default, "group", None) == group:
                return None if default.value is None else str(default.value)
        return None

    def config(self, group: str, option: str) -> dict[str, Any] | None:
        """The option's own values (its defaults list not applied), or None when it does not exist."""
        from omegaconf import OmegaConf

        loaded = self._repo.load_config(f"{group}/{option}")
        if loaded is None:
            return None
        values = OmegaConf.to_container(loaded.config)
        assert isinstance(values, dict)
        values.pop("defaults", None)
        return values

    def picks(self, group: str, option: str, picked_group: str) -> str | None:
        """Which option of `picked_group` the option's defaults list chooses (`override /engine: vllm`)."""
        loaded = self._repo.load_config(f"{group}/{option}")
        for default in loaded.defaults_list if loaded is not None else []:
            if getattr(default, "group", None) in (picked_group, f"/{picked_group}"):
                return str(default.value)
        return None

    def schema(self, group: str, option: str) -> str | None:
        """The schema the option starts from (`- /schema/<group>/<name>@_here_`): its name, or None."""
        loaded = self._repo.load_config(f"{group}/{option}")
        prefix = f"/schema/{group}/"
        for default in loaded.defaults_list if loaded is not None else []:
            path = str(getattr(default, "path", "") or "")
            if path.startswith(prefix):
                return path.removeprefix(prefix)
        return None


@functools.cache
def config_groups(config_dir: Path) -> ConfigGroups:
    return ConfigGroups(config_dir)
