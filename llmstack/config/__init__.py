"""Typed run config: schema (dataclasses), ConfigStore registration, resolution and validation rules."""

from __future__ import annotations


def register_resolvers() -> None:
    """OmegaConf resolvers our configs use; registered before any composition (Hydra's or the cache's)."""
    import time

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("llmstack.today"):
        # Not cached: each run reads the clock again.
        OmegaConf.register_new_resolver("llmstack.today", lambda: time.strftime("%Y%m%d"), use_cache=False)
