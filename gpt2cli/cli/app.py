"""The Typer app: registers one command per module and owns the single error boundary."""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from gpt2cli import __version__
from gpt2cli.cli import (
    bench_cmd,
    chat_cmd,
    convert,
    eval_cmd,
    generate_cmd,
    inspect_cmd,
    prepare_cmd,
    train_cmd,
)
from gpt2cli.cli.console import err
from gpt2cli.errors import UserError


def _debug() -> bool:
    return os.environ.get("GPT2_DEBUG", "") not in ("", "0")


class _ErrorBoundary(TyperGroup):
    """Turns a user mistake into one line on stderr and exit 1; a traceback only in debug."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # usage errors: Typer's job
            raise
        except UserError as exc:
            if _debug():
                raise
            err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(1) from None
        except BrokenPipeError:  # the reader of stdout left; main() ends quietly
            raise
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: one line unless debugging
            if _debug():
                raise
            err.print(
                f"[bold red]error:[/] {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                soft_wrap=True,
            )
            raise typer.Exit(1) from None


app = typer.Typer(
    name="gpt2",
    cls=_ErrorBoundary,
    help="A fast, faithful GPT-2 toolkit in JAX/Flax.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gpt2 {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks (or set GPT2_DEBUG=1)."
    ),
) -> None:
    """A fast, faithful GPT-2 toolkit in JAX/Flax."""
    if debug:
        os.environ["GPT2_DEBUG"] = "1"


app.command("convert")(convert.convert)
app.command("inspect")(inspect_cmd.inspect)
app.command("generate")(generate_cmd.generate)
app.command("bench")(bench_cmd.bench)
app.command("chat")(chat_cmd.chat)
app.command("prepare")(prepare_cmd.prepare)
app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.evaluate)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # `gpt2 generate ... | head`: the reader left, that is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
