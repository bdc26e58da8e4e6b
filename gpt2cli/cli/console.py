"""Where output goes: results to stdout, everything else (progress, stats, errors) to stderr."""

import os
import sys

from rich.console import Console

err = Console(stderr=True, highlight=False)


def stdout_gone() -> None:
    """The reader of stdout left (`gpt2 ... | head`): send whatever else we print nowhere, so
    no later write or flush fails. The caller then ends with exit code 0."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# What to lower when a command runs out of memory.
_SIZES = {
    "generate": "--num-samples, --max-new-tokens or the number of prompts",
    "chat": "--max-new-tokens",
    "train": "--batch-size or --seq-length (--grad-accum keeps the effective batch)",
    "eval": "--batch-size or --seq-length",
    "bench": "--batch, --prompt-tokens or --new-tokens",
}


def debugging() -> bool:
    return os.environ.get("GPT2_DEBUG", "") not in ("", "0")


def error_line(exc: Exception, command: str | None = None) -> str:
    """What the user reads of an error: a UserError's message; for an allocation that failed,
    what to lower; for anything else its type and message, and how to see the traceback."""
    from gpt2cli.errors import UserError

    if isinstance(exc, UserError):
        return str(exc)
    text = str(exc)
    if "RESOURCE_EXHAUSTED" in text:
        first = text.splitlines()[0]
        return f"out of memory ({first}): lower {_SIZES.get(command or '', 'the sizes')}"
    return f"{type(exc).__name__}: {text} (run with --debug for the traceback)"


def print_error(message: str) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
