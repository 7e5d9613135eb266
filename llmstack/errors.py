"""The exception tree. The CLI prints these messages as one paragraph, without a traceback.

`LLMSTACK_FULL_ERROR=1` makes the CLI show the traceback as well.
"""

from __future__ import annotations

from collections.abc import Iterable


class LlmstackError(Exception):
    """Base of every error the CLI reports compactly."""

    exit_code = 1


class ConfigError(LlmstackError):
    """A composed config that must not launch. Raised before anything starts."""

    exit_code = 2

    def __init__(
        self,
        key: str,
        value: object,
        reason: str,
        choices: Iterable[object] | None = None,
        hint: str | None = None,
    ) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        self.choices = list(choices) if choices is not None else None
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"Invalid config: {self.key}={self.value!s}: {self.reason}"
        if self.choices is not None:
            shown = ", ".join(str(c) for c in self.choices) if self.choices else "(none here)"
            text += f" Valid choices: {shown}."
        if self.hint:
            text += f" {self.hint}"
        return text


class EngineError(LlmstackError):
    """The serving engine failed to start, died, or never became ready."""

    exit_code = 3

    def __init__(self, message: str, log_tail: list[str] | None = None) -> None:
        self.log_tail = log_tail or []
        super().__init__(message)

    def __str__(self) -> str:
        text = super().__str__()
        if self.log_tail:
            text += "\nLast lines of the engine log:\n" + "\n".join("  | " + line for line in self.log_tail)
        return text


class BenchmarkError(LlmstackError):
    """The benchmark phase could not run or produced no result."""

    exit_code = 4


class Interrupted(LlmstackError):
    """Ctrl-C or SIGTERM: the run was stopped on request."""

    exit_code = 130
