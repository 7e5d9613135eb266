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


class ResultsError(LlmstackError):
    """A result could not be written (a full disk, a read-only mount)."""

    exit_code = 1


class Interrupted(BaseException):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP): the run was stopped on request, which is not a failure.

    Outside the LlmstackError tree, as KeyboardInterrupt is outside Exception, so that nothing that handles
    failures swallows it: a grid stops instead of recording a failed job and starting the next one. The
    exit status is the shell's for a death by that signal: 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP).
    """

    def __init__(self, signum: int, where: str | None = None) -> None:
        self.signum = int(signum)
        self.where = where
        super().__init__(self.signum, where)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        import signal

        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def __str__(self) -> str:
        return f"interrupted by {self.signal_name}" + (f" during {self.where}" if self.where else "")


def describe_unexpected(exc: BaseException) -> str:
    """One line for an error outside llmstack's own types."""
    import errno

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"the disk is full: {exc}"
    return f"internal error: {type(exc).__name__}: {exc}"
