"""Where output goes: results to stdout, everything else (progress, stats, errors) to stderr."""

from rich.console import Console

err = Console(stderr=True, highlight=False)
