from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from llmstack.cli import CONFIG_DIR
from llmstack.config import register_resolvers
from llmstack.config.store import register_schemas

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # One tiny model per test session, never the user's cache.
    monkeypatch.setenv("LLMSTACK_CACHE", str(_session_cache(tmp_path_factory)))


_CACHE: list[Path] = []


def _session_cache(factory: pytest.TempPathFactory) -> Path:
    if not _CACHE:
        _CACHE.append(Path(os.environ.get("LLMSTACK_TEST_CACHE") or factory.mktemp("llmstack-cache")))
    return _CACHE[0]


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose the real configs/ with overrides, as the CLI does."""

    def _compose(*overrides: str) -> DictConfig:
        register_schemas()
        register_resolvers()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture
def llmstack_cmd() -> list[str]:
    return [sys.executable, "-m", "llmstack"]
