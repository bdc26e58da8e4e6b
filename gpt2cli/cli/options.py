"""Options shared by several commands, spelled once."""

from __future__ import annotations

from typing import Annotated

import typer

from gpt2cli import precision

DEFAULT_MODEL = "gpt2"

ModelRef = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        "--model-name",
        help="A .npz checkpoint, a Hugging Face folder, or a Hub repo id.",
    ),
]
TokenizerRef = Annotated[
    str | None,
    typer.Option(
        "--tokenizer",
        help="HF folder or repo id whose tokenizer to use (default: the model's, else GPT-2's).",
    ),
]


def _check_dtype(value: str | None) -> str | None:
    if value is not None and value not in precision.NAMES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(precision.NAMES)}")
    return value


Dtype = Annotated[str, typer.Option("--dtype", help=precision.HELP, callback=_check_dtype)]
JsonOutput = Annotated[
    bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")
]
