"""`gpt2 eval`: loss and perplexity of a model on text files."""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer

from gpt2cli.cli.console import err
from gpt2cli.cli.options import DEFAULT_MODEL, Dtype, JsonOutput, ModelRef, TokenizerRef
from gpt2cli.errors import UserError

Opt = typer.Option


def evaluate(
    dataset: Annotated[
        list[str],
        Opt(
            "--dataset",
            "-d",
            help="Text file(s) or globs (relative names are read from $DATA_DIR), or a "
            "folder made by gpt2 prepare (its validation split is scored).",
        ),
    ],
    more_files: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="FILES",
            help="More dataset files (what a shell makes of --dataset val/*.txt).",
            show_default=False,
        ),
    ] = None,
    model: ModelRef = DEFAULT_MODEL,
    tokenizer: TokenizerRef = None,
    seq_length: Annotated[
        int | None, Opt("--seq-length", help="Window length \\[default: the model's context].")
    ] = None,
    stride: Annotated[
        int | None,
        Opt(
            "--stride",
            help="Window step; less than --seq-length scores each token with more "
            "context (HF perplexity guide) \\[default: --seq-length, no overlap].",
        ),
    ] = None,
    batch_size: Annotated[int, Opt("--batch-size", "-b", help="Windows per forward pass.")] = 4,
    dtype: Dtype = "float32",
    errors: Annotated[
        str, Opt("--errors", help="Non-UTF-8 bytes: strict (stop) or replace.")
    ] = "strict",
    as_json: JsonOutput = False,
) -> None:
    """Loss and perplexity of a model on text files.

    Examples:

      gpt2 eval -m runs/ft/final.npz --dataset val.txt

      gpt2 eval -m gpt2 --dataset wiki.txt --seq-length 1024 --stride 512 --json

      gpt2 eval -m runs/scratch/final.npz --dataset data/corpus
    """
    import os

    if errors not in ("strict", "replace"):
        raise UserError(f"--errors must be strict or replace, got {errors!r}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size}")

    import numpy as np
    from rich.progress import BarColumn, Progress, TextColumn

    from gpt2cli import compile_cache, data
    from gpt2cli import evaluate as evaluation
    from gpt2cli.hub import load_model, load_tokenizer

    compile_cache.enable()
    names = list(dataset) + list(more_files or [])
    prepared = _prepared(names)
    files = [] if prepared else data.resolve_files(names, os.environ.get("DATA_DIR"))
    config, params = load_model(model)
    if prepared:
        prepared.check_tokenizer(load_tokenizer(tokenizer, model))
        tokens = np.asarray(prepared.validation())
    else:
        tokens = data.load_tokens(files, load_tokenizer(tokenizer, model), errors=errors)
    length = seq_length or config.n_positions
    with Progress(
        TextColumn("evaluating"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("eval", total=None)
        result = evaluation.evaluate(
            config,
            params,
            tokens,
            length=length,
            stride=stride or length,
            batch_size=batch_size,
            dtype=dtype,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    figures = {
        "loss": result.loss,
        "perplexity": result.perplexity,
        "tokens_scored": result.n_tokens,
        "windows": result.n_windows,
        "seq_length": length,
        "stride": stride or length,
    }
    if as_json:
        typer.echo(
            json.dumps(
                figures if math.isfinite(result.perplexity) else {**figures, "perplexity": None}
            )
        )
    else:
        typer.echo(
            f"loss {result.loss:.4f}  perplexity {result.perplexity:.4f}  "
            f"({result.n_tokens} tokens in {result.n_windows} windows of {length}, stride {stride or length})"
        )


def _prepared(names: list[str]):
    """The prepared folder (`gpt2 prepare`) that --dataset names, if it names one."""
    from gpt2cli.training.shards import is_prepared, open_prepared

    if len(names) == 1 and is_prepared(names[0]):
        return open_prepared(names[0])
    return None
