"""A model's shape facts (model.arch), filled from its config.json where the config leaves them unknown.

The checked-in models carry their published config.json values in configs/model/*.yaml, so a plan for
another machine (dry_run) can be checked without the weights. model=local and model=tiny read them from
config.json in model.path when it is there. Values set in the config always win over the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from llmstack.config.schema import ModelArchitecture, ModelConfig

logger = logging.getLogger(__name__)

ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ModelArchitecture) if f.name != "num_parameters")


def read_config_json(model_dir: str | Path) -> dict[str, Any] | None:
    """The architecture keys of `model_dir/config.json`, or None when there is no readable file."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    # Multimodal checkpoints keep the language model's shape under text_config.
    text = data.get("text_config")
    if "hidden_size" not in data and isinstance(text, dict):
        data = {**text, **{k: v for k, v in data.items() if k == "tie_word_embeddings"}}
    return {key: data[key] for key in ARCH_FIELDS if data.get(key) is not None}


def with_config_json(model: ModelConfig) -> ModelConfig:
    """`model` with every unknown arch fact filled from config.json (when model.path has one)."""
    if model.path is None:
        return model
    known = dataclasses.asdict(model.arch)
    if all(known[key] is not None for key in ARCH_FIELDS):
        return model
    found = read_config_json(model.path)
    if not found:
        return model
    filled = {key: value for key, value in found.items() if known[key] is None}
    if not filled:
        return model
    logger.debug("model.arch from %s/config.json: %s", model.path, filled)
    return dataclasses.replace(model, arch=dataclasses.replace(model.arch, **filled))
