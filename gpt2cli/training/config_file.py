"""`--config run.toml` and `--print-config`: settings as a flat TOML file.

Keys are the long flag names, spelled with `-` or `_`; values have the setting's type. The
file printed by `--print-config` reads back to the same settings.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from gpt2cli.errors import UserError
from gpt2cli.training import settings


def read(path: str | Path) -> dict[str, Any]:
    """Setting name -> value from a TOML file; an unknown key or a wrong type is one line."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: {exc}") from None
    values, spelled = {}, {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in settings.FIELDS:
            hint = (
                " (a table? keys are flat: the long flag names)" if isinstance(value, dict) else ""
            )
            raise UserError(f"{path}: unknown key {key!r}{hint}")
        if name in spelled:
            raise UserError(f"{path}: {spelled[name]!r} and {key!r} are the same setting; keep one")
        spelled[name] = key
        values[name] = settings.check_value(name, value, f"{path}: ")
    return values


def dumps(given: settings.Settings, resolved: settings.Settings | None = None) -> str:
    """TOML for the settings `given`, grouped and commented. A setting left unset there (one
    derived from others) stays a comment, with what it resolves to in `resolved`, so a file
    that changes --steps or the shape derives it again."""
    lines = ["# gpt2 train settings: gpt2 train --config THIS_FILE", ""]
    values = given.flat()
    derived = (resolved or given).flat()
    for group, kind in settings.GROUPS.items():
        lines.append(f"# [{group}] {kind.__doc__.strip()}")
        for name, (owner, f) in settings.FIELDS.items():
            if owner != group:
                continue
            key = name.replace("_", "-")
            help_text = f.metadata["help"]
            if values[name] is not None:
                lines.append(f"{key} = {_toml(values[name])}  # {help_text}")
            elif derived[name] is not None:
                lines.append(f"# {key} = {_toml(derived[name])}  # derived: {help_text}")
            else:
                lines.append(f"# {key} = <unset>  # {help_text}")
        lines.append("")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")
