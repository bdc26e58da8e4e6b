"""Options shared by several commands, spelled once. A command gives its own default where it
differs (chat samples with temperature 0.7; generate is greedy).

A value outside its range is a usage error (exit 2) caught while the flags are parsed, before
anything loads: the callbacks run the core's own checks (`sampling_checks`), so each range is
written in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli import precision
from gpt2cli.errors import ParameterError, UserError
from gpt2cli.sampling_checks import check_sampling, check_seed
from gpt2cli.training.settings import check_text_errors, flag

DEFAULT_MODEL = "gpt2"


def _checked(check: Callable[[Any], None]) -> Callable[[Any], Any]:
    """A callback that runs `check` on the given value and turns its UserError into a usage error."""

    def callback(value):
        if value is not None:
            try:
                check(value)
            except UserError as exc:
                raise typer.BadParameter(str(exc)) from None
        return value

    return callback


@contextmanager
def flags_for(names: Collection[str], **renamed: str) -> Iterator[None]:
    """A command's flag where the core names its parameter (`lr` becomes `--lr`): the core
    knows no flags (ARCHITECTURE.md, 16). `names`: parameters whose flag is their name;
    `renamed`: parameter -> flag for the others."""
    try:
        yield
    except ParameterError as exc:
        if exc.name in renamed:
            raise UserError(f"{renamed[exc.name]} {exc.problem}") from None
        if exc.name in names:
            raise UserError(f"{flag(exc.name)} {exc.problem}") from None
        raise


seed_callback = _checked(check_seed)  # also for train's --seed, whose help differs


def _positive(value: int) -> None:
    if value < 1:
        raise UserError(f"must be at least 1, got {value}")


def _no_empty_stop(values: list[str]) -> None:
    if any(value == "" for value in values):
        raise UserError("an empty stop string would end every reply before it starts")


ModelRef = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        "--model-name",
        help="A .npz checkpoint, a Hugging Face folder, a Hub repo id, or the bundled demo "
        "model 'shakespeare'.",
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
    str, typer.Option("--dtype", help=precision.HELP, callback=_checked(precision.get))
]
JsonOutput = Annotated[
    bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")
]

# ---- sampling (generate, chat, bench) ----------------------------------------------------

Temperature = Annotated[
    float,
    typer.Option(
        "--temperature",
        help="0 = greedy (deterministic); higher = more random.",
        callback=_checked(lambda v: check_sampling(temperature=v)),
    ),
]
TopK = Annotated[
    int,
    typer.Option(
        "--top-k",
        help="Sample from the k likeliest tokens only (0 = off).",
        callback=_checked(lambda v: check_sampling(top_k=v)),
    ),
]
TopP = Annotated[
    float,
    typer.Option(
        "--top-p",
        help="Nucleus sampling: the likeliest tokens up to this probability mass, in (0, 1] "
        "(1 = off).",
        callback=_checked(lambda v: check_sampling(top_p=v)),
    ),
]
MinP = Annotated[
    float,
    typer.Option(
        "--min-p",
        help="Drop tokens below min_p x the likeliest token's probability (0 = off).",
        callback=_checked(lambda v: check_sampling(min_p=v)),
    ),
]
RepetitionPenalty = Annotated[
    float,
    typer.Option(
        "--repetition-penalty",
        help="Penalise tokens already present, Hugging Face style (1 = off).",
        callback=_checked(lambda v: check_sampling(repetition_penalty=v)),
    ),
]
Seed = Annotated[
    int,
    typer.Option(
        "--seed",
        help="Random seed, 0 to 2^32-1: the same seed gives the same text.",
        callback=seed_callback,
    ),
]
Stop = Annotated[
    list[str] | None,
    typer.Option(
        "--stop",
        help="Stop before this string (repeatable).",
        callback=_checked(_no_empty_stop),
    ),
]
MaxNewTokens = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens",
        "-n",
        help="Most tokens to generate (chat: per reply) [default: 100; chat: at most a "
        "quarter of the model's window].",
        callback=_checked(_positive),
    ),
]

# ---- text files (train, eval) --------------------------------------------------------

Dataset = Annotated[
    list[str] | None,
    typer.Option(
        "--dataset",
        "-d",
        help="Text file(s), globs, or a folder made by gpt2 prepare; relative names are read "
        "from $DATA_DIR.",
    ),
]
MoreFiles = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="FILES",
        help="More dataset files (what a shell makes of --dataset corpus/*.txt).",
        show_default=False,
    ),
]
TextErrors = Annotated[
    str | None,
    typer.Option(
        "--errors",
        help="Non-UTF-8 bytes: strict (stop) or replace [default: strict].",
        callback=_checked(check_text_errors),
    ),
]

# ---- steering (generate, chat, serve) ----------------------------------------------------

Steer = Annotated[
    Path | None,
    typer.Option(
        "--steer",
        metavar="VECTOR.npy",
        help="Steer the text: add this vector [n_embd] (gpt2 lens --save-direction makes one) "
        "to the residual stream entering block --steer-layer, at every position.",
    ),
]
SteerLayer = Annotated[
    int | None,
    typer.Option(
        "--steer-layer", min=0, help="With --steer: the block whose input it joins (from 0)."
    ),
]
SteerScale = Annotated[
    float | None,
    typer.Option(
        "--steer-scale",
        help="With --steer: what the vector is multiplied by, 0 = off [default: 1].",
    ),
]


def check_steer_flags(steer: Path | None, layer: int | None, scale: float | None) -> None:
    """Refuse --steer without a layer, or a layer or scale without --steer (before any loading)."""
    if steer is None:
        for flag, value in (("--steer-layer", layer), ("--steer-scale", scale)):
            if value is not None:
                raise usage_error(flag, "it only applies with --steer VECTOR.npy")
    elif layer is None:
        raise usage_error("--steer-layer", "missing: --steer needs the block to steer at")


def steering(config, steer: Path | None, layer: int | None, scale: float | None):
    """The engine's `Steering` that the checked --steer flags ask for (None without --steer).
    A layer this model lacks is a usage error; a vector of another width, one error line."""
    if steer is None:
        return None
    if layer >= config.n_layer:
        raise usage_error(
            "--steer-layer", f"{layer} is outside this model's 0..{config.n_layer - 1}"
        )
    from gpt2cli.engine import Steering
    from gpt2cli.lens import load_vector

    chosen = Steering(layer, load_vector(steer, config.n_embd))
    return chosen if scale is None else chosen.replace(scale=scale)


def usage_error(flag: str, message: str) -> typer.BadParameter:
    """A usage error about `flag` found after the flags were parsed (the usage line, exit 2)."""
    import click

    return typer.BadParameter(message, ctx=click.get_current_context(silent=True), param_hint=flag)
