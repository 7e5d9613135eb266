"""Hydra's composition errors, said the way llmstack says its own: one paragraph, the key, the valid choices.

Hydra reports an unknown option, an unknown key, a wrong type or an ambiguous value in several lines with
its schema class names and its config search path. The CLI lets Hydra raise them (HYDRA_FULL_ERROR, read by
Hydra's `run_and_report`) and hands each one here; `LLMSTACK_FULL_ERROR=1` shows Hydra's own text as well.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Sequence
from pathlib import Path

from llmstack.config.unknown_keys import no_such_key
from llmstack.errors import ConfigError

_AMBIGUOUS = re.compile(r"Ambiguous value for argument '([^=']+)=([^']*)'")
_INSTALL_HINTS = {
    "hydra/launcher": "Hydra's launcher plugins come with the grid extra: scripts/setup.sh --test installs "
    "it, or pip install -e '.[grid]'.",
}


def describe(exc: BaseException, overrides: Sequence[str], config_dir: Path) -> ConfigError | None:
    """The ConfigError saying what Hydra's exception says, or None when it is not a composition error."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ConfigTypeError, ValidationError

    if isinstance(exc, MissingConfigException):
        return _missing_option(exc, config_dir)
    if isinstance(exc, OverrideParseException):
        return _unparsable(exc)
    if not isinstance(exc, ConfigCompositionException):
        return None
    cause = exc.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        key = str(cause.full_key)
        owner = _owner(key, overrides, config_dir)
        return no_such_key(key, _value_of(key, overrides), cause.object_type, owner)
    if isinstance(cause, ValidationError) and cause.full_key:
        return _wrong_type(cause, overrides)
    if isinstance(cause, ConfigTypeError) and "deletion" in str(cause):
        key = str(cause.full_key or "?")
        return ConfigError(
            key, "(deleted with ~)", "a key of the schema cannot be deleted.", hint=f"Set it: {key}=..."
        )
    if (ambiguous := _AMBIGUOUS.search(str(exc))) is not None:
        key, value = ambiguous.groups()
        return ConfigError(
            key,
            value,
            "a comma-separated value is a sweep, and a sweep needs -m.",
            hint=f"Use -m for a grid of one run per value (python -m llmstack -m {key}={value}), or a list "
            f"for one run ({key}=[{value}]).",
        )
    return None


def _missing_option(exc: typing.Any, config_dir: Path) -> ConfigError | None:
    missing = str(exc.missing_cfg_file or "")
    group, _, option = missing.rpartition("/")
    if not group:
        return None
    options = list(exc.options or [])
    if not options and group not in _INSTALL_HINTS:
        from llmstack.config.groups import config_groups

        groups = config_groups(Path(config_dir)).groups()
        close = difflib.get_close_matches(group, groups, n=1, cutoff=0.6)
        reason = f"there is no group {group}" + (f"; did you mean {close[0]}?" if close else ".")
        return ConfigError(group, option, reason, groups)
    reason = f"is not an option of {group}."
    if close := difflib.get_close_matches(option, options, n=1, cutoff=0.5):
        reason = f"is not an option of {group}; did you mean {group}={close[0]}?"
    return ConfigError(group, option, reason, options, hint=_INSTALL_HINTS.get(group))


def _unparsable(exc: typing.Any) -> ConfigError:
    override = str(exc.override)
    key, _, value = override.partition("=")
    first = str(exc.message).splitlines()[0].rstrip(".")
    return ConfigError(
        key,
        value,
        f"cannot be parsed ({first}).",
        hint="Write lists as [1,4], quote a value with spaces or special characters (key='a b'); the grammar "
        "is https://hydra.cc/docs/advanced/override_grammar/basic/.",
    )


def _wrong_type(cause: typing.Any, overrides: Sequence[str]) -> ConfigError:
    """`engine.port=abc: must be an integer.`; an element of a list is named by its index."""
    full_key = str(cause.full_key)
    if re.search(r"\[\d+\]$", full_key):  # an element of a list: the list knows its element type
        hint = getattr(getattr(cause.parent_node, "_metadata", None), "element_type", None)
    else:
        hint = _type_hints(cause.object_type).get(full_key.rpartition(".")[2])
    expected = _kind(hint) if hint not in (None, typing.Any) else "of another type"
    given_key, value = _override_of(full_key.split("[")[0], overrides)
    reason = f"must be {expected}." if given_key == full_key else f"{full_key} must be {expected}."
    return ConfigError(given_key, value, reason)


def _type_hints(schema: type | None) -> dict[str, typing.Any]:
    if schema is None or not dataclasses.is_dataclass(schema):
        return {}
    try:
        return typing.get_type_hints(schema)
    except Exception:  # a hint that does not evaluate: the message goes without the type
        return {}


def _kind(hint: typing.Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return " or ".join(_kind(a) for a in args) + " (or null)"
    if origin is list:
        example = {int: "[1,4]", float: "[0.5,2]", str: "[a,b]"}.get(args[0] if args else None, "[...]")
        return f"a list of {_plural(args[0])} like {example}" if args else "a list like [...]"
    if origin is dict:
        return "a mapping like {KEY: value}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _plural(hint: typing.Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(hint, str(hint))


def _value_of(full_key: str, overrides: Sequence[str]) -> str:
    """The value the command line gave the key ("(set in a config file)" when none did)."""
    return _override_of(full_key, overrides)[1]


def _override_of(full_key: str, overrides: Sequence[str]) -> tuple[str, str]:
    """The override that set the key or a key below it (`engine.port.x=3`), as (key, value)."""
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if sep and (key == full_key or key.startswith(f"{full_key}.")):
            return key, value
    return full_key, "(set in a config file)"


def _owner(full_key: str, overrides: Sequence[str], config_dir: Path) -> str | None:
    """`engine=lightweight` for a key under the engine group: the option the command line or the defaults
    picked, so the message names what the user chose rather than a schema class."""
    from llmstack.config.groups import config_groups

    group = full_key.partition(".")[0]
    if full_key.count(".") != 1:
        return None
    chosen = dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o and "." not in o.split("=")[0])
    try:
        groups = config_groups(Path(config_dir))
        if group not in groups.groups():
            return None
        option = chosen.get(group)
        if option is None and "profile" in chosen:
            option = groups.picks("profile", chosen["profile"], group)
        option = option or groups.default(group)
    except Exception:  # only a nicety of the message
        return None
    return f"{group}={option}" if option else None
