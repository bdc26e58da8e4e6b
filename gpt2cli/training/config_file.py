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
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in settings.FIELDS:
            hint = (
                " (a table? keys are flat: the long flag names)" if isinstance(value, dict) else ""
            )
            raise UserError(f"{path}: unknown key {key!r}{hint}")
        values[name] = settings.check_value(name, value, f"{path}: ")
    return values


def dumps(s: settings.Settings) -> str:
    """TOML for the settings `s`, grouped and commented; unset (derived) values are comments."""
    lines = ["# gpt2 train settings: gpt2 train --config THIS_FILE", ""]
    values = s.flat()
    for group, kind in settings.GROUPS.items():
        lines.append(f"# [{group}] {kind.__doc__.strip()}")
        for name, (owner, f) in settings.FIELDS.items():
            if owner != group:
                continue
            key = name.replace("_", "-")
            value = values[name]
            help_text = f.metadata["help"]
            if value is None:
                lines.append(f"# {key} = <unset>  # {help_text}")
            else:
                lines.append(f"{key} = {_toml(value)}  # {help_text}")
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
