"""The JSON header every file we write starts from: {"format": name, "version": n, ...}.

One reader for all of them (.npz checkpoints, run.json, training checkpoints, a prepared
folder's index.json), so a foreign file or one from a newer gpt2 reads the same way everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt2cli.errors import UserError


def read_json(file: Path) -> Any:
    """The JSON value in `file`; a file that is missing or not JSON is one line naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {file}: {exc}") from None


def check_header(
    header: Any, file: Path | str, *, format: str, version: int, what: str, fix: str = ""
) -> dict[str, Any]:
    """`header` itself when it names `format` at `version`, the one version this gpt2 reads.

    `what` says what the file should be ("a gpt2 checkpoint"); `fix`, appended to the version
    message, what the user can do about a file of another version.
    """
    if not isinstance(header, dict) or header.get("format") != format:
        raise UserError(f"{file} is not {what} (its header format is not {format!r})")
    if header.get("version") != version:
        raise UserError(
            f"{file} is version {header.get('version')!r} of {format!r}; "
            f"this gpt2 reads version {version}{fix}"
        )
    return header
