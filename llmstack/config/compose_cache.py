"""A cache of composed configs, so a repeated command line starts the engine without importing Hydra.

Importing Hydra and composing (which `hydra.main` does twice) costs most of a second; a launcher should hand
over to the engine in well under that. A command line of plain overrides (`key=value`, `group=option`) is
composed by Hydra once; its result, *unresolved* (so `${oc.env:...}` still reads the environment at each run),
is stored under a key made of every input that shapes it: the overrides, the llmstack version and the name,
size and mtime of every file in the config directory and of the schema module. Anything else on the command
line (`-m`, `--cfg`, `--config-dir`, `hydra.*`) always goes through Hydra.

The directory holds at most MAX_ENTRIES files: a hit touches its file, and each store removes the least
recently used beyond that (a sweep over many values would otherwise leave one file per command line forever).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

# Resolvers that only exist once Hydra is imported: configs using them are never served from the cache.
_HYDRA_ONLY_RESOLVERS = ("${now:", "${hydra:")
# About 2 KiB each: the newest few hundred command lines, well under a megabyte.
MAX_ENTRIES = 200
# A temporary file this old was left by a writer that died between writing and renaming.
_STALE_TMP_S = 3600


def cacheable(args: list[str]) -> bool:
    return all(
        not arg.startswith("-") and "=" in arg and not arg.lstrip("+~").startswith(("hydra.", "hydra/"))
        for arg in args
    )


def cache_key(config_dir: Path, args: list[str]) -> str:
    import llmstack
    from llmstack.config import schema

    digest = hashlib.sha256()
    digest.update(f"{llmstack.__version__}\0{config_dir.resolve()}\0".encode())
    digest.update("\0".join(args).encode())
    # The schemas: the run's in config/schema.py, each benchmark phase's beside its phase.
    schemas = [Path(schema.__file__), *(Path(schema.__file__).parent.parent / "phases").glob("*.py")]
    for path in sorted([*config_dir.rglob("*.yaml"), *schemas]):
        stat = path.stat()
        digest.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def cache_path(config_dir: Path, args: list[str]) -> Path:
    from llmstack.models.tiny import default_cache_dir

    return default_cache_dir() / "compose" / f"{cache_key(config_dir, args)}.yaml"


def load(config_dir: Path, args: list[str]) -> DictConfig | None:
    """The typed composed config for these overrides, or None when it was never stored."""
    if os.environ.get("LLMSTACK_NO_COMPOSE_CACHE") or not cacheable(args):
        return None
    path = cache_path(config_dir, args)
    try:
        raw = OmegaConf.create(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: the last to be pruned
    from llmstack.config.schema import RunConfig
    from llmstack.engines import ENGINE_SCHEMAS
    from llmstack.phases.registry import benchmark_schema

    engine = ENGINE_SCHEMAS.get(str(raw.get("engine", {}).get("name")))
    benchmark = benchmark_schema(str(raw.get("benchmark", {}).get("phase")))
    if engine is None or benchmark is None:
        return None
    from omegaconf.errors import OmegaConfBaseException

    try:
        typed = OmegaConf.structured(RunConfig)
        typed.engine = OmegaConf.structured(engine)
        typed.benchmark = OmegaConf.structured(benchmark)
        return OmegaConf.merge(typed, raw)  # type: ignore[return-value]
    except OmegaConfBaseException:  # a key its schema lacks (never stored, so a file of another version)
        return None


def store(config_dir: Path, args: list[str], cfg: DictConfig) -> None:
    from llmstack.config.unknown_keys import unknown_key_error

    # A config with a key its schema lacks (`+engine.max_num_seq=64`) is refused each time, by Hydra's path.
    if not cacheable(args) or unknown_key_error(cfg) is not None:
        return
    text = OmegaConf.to_yaml(cfg, resolve=False)
    if any(marker in text for marker in _HYDRA_ONLY_RESOLVERS):
        return
    path = cache_path(config_dir, args)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    prune(path.parent)


def prune(directory: Path, keep: int | None = None) -> None:
    """Keep the `keep` (MAX_ENTRIES) most recently used entries of `directory`; drop the others and stale
    temporary files. Another launcher may prune or store at once: a file already gone is no error."""
    import time

    keep = MAX_ENTRIES if keep is None else keep
    entries: list[tuple[float, Path]] = []
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):
                mtime = entry.stat().st_mtime
                if entry.name.endswith(".tmp"):
                    if now - mtime > _STALE_TMP_S:
                        os.unlink(entry.path)
                elif entry.name.endswith(".yaml"):
                    entries.append((mtime, Path(entry.path)))
    entries.sort(reverse=True)
    for _, old in entries[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()
