"""The benchmark client's one exception: input it cannot use (a dataset file, an image). Callers decide how
to report it; the launcher's phases turn it into llmstack's BenchmarkError (exit status 4)."""

from __future__ import annotations

__all__ = ["BenchInputError"]


class BenchInputError(ValueError):
    """A dataset or image the client was given cannot be used; the message says which and why."""
