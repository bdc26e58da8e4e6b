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
