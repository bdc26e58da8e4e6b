"""Options shared by several commands, spelled once."""

from __future__ import annotations

from typing import Annotated

import typer

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
Dtype = Annotated[
    str,
    typer.Option("--dtype", help="Weights and compute dtype: float32 or bfloat16."),
]
JsonOutput = Annotated[
    bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")
]
