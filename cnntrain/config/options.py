"""What an option of the training config is made of: a default, its --help text, its allowed values.

Each option is declared once, in its section (``sections.py``), with :func:`option`; the command
line, ``config.yaml`` and the checks all read that declaration.
"""

from __future__ import annotations

import types
import typing
from dataclasses import field
from typing import Any

from cnntrain.errors import ConfigError, did_you_mean


def option(default: Any, help: str, *, choices: tuple[str, ...] = (), secret: bool = False) -> Any:
    """A config field: its default, its ``--help`` text (with units) and, for a string, its allowed values.

    A ``secret`` option never appears in ``repr`` nor in ``TrainConfig.to_dict`` (so neither in
    ``config.yaml`` nor in checkpoints)."""
    metadata = {"help": help, "choices": choices, "secret": secret}
    if isinstance(default, dict):
        if default:
            raise ValueError("a dict option's default must be empty")
        return field(default_factory=FrozenDict, metadata=metadata)
    return field(default=default, metadata=metadata, repr=not secret)


def flag(name: str) -> str:
    """The command-line spelling of an option: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


class FrozenDict(dict):
    """A dict that refuses changes: the value of a dict option (``model_kwargs``) in a frozen config."""

    def _refuse(self, *args: Any, **kwargs: Any) -> typing.NoReturn:
        raise TypeError("a config does not change once built: use cfg.replace(option=value)")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):  # pickle and copy rebuild it whole instead of item by item
        return FrozenDict, (dict(self),)


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag(name)} {value!r} is not one of {', '.join(allowed)}"
                          f"{did_you_mean(str(value), allowed)}")


def coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML / command-line value to the option's type, with an error naming the option.

    Lists become tuples and dicts :class:`FrozenDict`, so a built config holds nothing mutable."""
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return hint(value)
        if origin is tuple:
            item = typing.get_args(hint)[0]
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(item(v) for v in items)
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return FrozenDict(value)
        if origin in (typing.Union, types.UnionType):
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"option {name!r}: cannot use {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value
