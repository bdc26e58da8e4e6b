"""Check values read from a file (run.json, config.json) against a dataclass's field types,
so a hand-edited `"batch_size": "two"` is one line naming the file and the field."""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from gpt2cli.errors import UserError

_WORDS = {int: "a whole number", float: "a finite number", str: "a string", bool: "true or false"}


def check_types(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse a value whose type does not fit its field of `cls` (unknown names are let pass)."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not fits(value, hints[name]):
            raise UserError(f"{where}{name} must be {describe(hints[name])}, got {value!r}")


def fits(value: Any, kind: Any) -> bool:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return any(fits(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    origin = typing.get_origin(kind) or kind
    return isinstance(value, origin) if isinstance(origin, type) else True


def describe(kind: Any) -> str:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return " or ".join(
            "null" if k is type(None) else describe(k) for k in typing.get_args(kind)
        )
    origin = typing.get_origin(kind) or kind
    return _WORDS.get(kind, f"a {getattr(origin, '__name__', origin)}")
