"""A name -> object table whose entries are imported on first use.

The engine and benchmark-phase registries list every option, but a run needs only the one it picked: a
`benchmark=none` dry run should not import four phase modules and their HTTP runner to start. Entries are
"module:attribute" (or "module" for the module itself) strings, so listing them costs nothing;
`tests/test_architecture.py` imports each one.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class LazyRegistry(Generic[T]):
    def __init__(self, entries: dict[str, str]) -> None:
        self._entries = dict(entries)
        self._loaded: dict[str, T] = {}

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        if name not in self._loaded:
            module, _, attribute = self._entries[name].partition(":")
            loaded = importlib.import_module(module)
            self._loaded[name] = getattr(loaded, attribute) if attribute else loaded
        return self._loaded[name]

    def get(self, name: str) -> T | None:
        return self[name] if name in self._entries else None

    def items(self) -> Iterator[tuple[str, T]]:
        """Every entry, importing them all (Hydra's ConfigStore needs every schema to compose)."""
        for name in self._entries:
            yield name, self[name]
