"""Composition: the typed run config (schema dataclasses), ConfigStore registration, the group options, the
compose cache, resolution of `auto` values, and secrets."""

from __future__ import annotations

import os
from pathlib import Path

# configs/: the checked-in groups Hydra composes (LLMSTACK_CONFIG_DIR: another tree, for tests and forks).
CONFIG_DIR = Path(
    os.environ.get("LLMSTACK_CONFIG_DIR", Path(__file__).resolve().parent.parent.parent / "configs")
)


def register_resolvers() -> None:
    """OmegaConf resolvers our configs use; registered before any composition (Hydra's or the cache's)."""
    import time

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("llmstack.today"):
        # Not cached: each run reads the clock again.
        OmegaConf.register_new_resolver("llmstack.today", lambda: time.strftime("%Y%m%d"), use_cache=False)
