"""The Typer app: registers one command per module and owns the single error boundary."""

from __future__ import annotations

import functools
import math
import os
import sys

import typer
from typer._click import exceptions as click_errors  # Typer vendors its own Click
from typer.core import TyperGroup

from gpt2cli import __version__
from gpt2cli.cli import (
    bench_cmd,
    chat_cmd,
    convert,
    eval_cmd,
    generate_cmd,
    inspect_cmd,
    interrupts,
    lens_cmd,
    prepare_cmd,
    serve_cmd,
    train_cmd,
)
from gpt2cli.cli.console import debugging, err, error_line, print_error, stdout_gone

_INT_LIMIT = 2**31 - 1  # JAX computes steps, lengths and counts in int32


def _finite_floats(callback, params):
    """Every float option of every command refuses nan and inf, and every whole-number option
    a value beyond int32 (seeds have their own, wider range), as usage errors."""
    if getattr(callback, "finite_floats", False):
        return callback
    flags = {p.name: p.opts[0] if p.opts else p.name for p in params}

    @functools.wraps(callback)
    def checked(**kwargs):
        for name, value in kwargs.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise typer.BadParameter(f"{value} is not a finite number", param_hint=flags[name])
            too_big = isinstance(value, int) and not isinstance(value, bool)
            if too_big and name != "seed" and abs(value) > _INT_LIMIT:
                raise typer.BadParameter(
                    f"{value} is too large (at most {_INT_LIMIT})", param_hint=flags[name]
                )
        return callback(**kwargs)

    checked.finite_floats = True
    return checked


class _ErrorBoundary(TyperGroup):
    """The one place where errors meet the user.

    A user mistake: one `error:` line on stderr, exit 1. A usage error (unknown command or
    option, a bad value): the usage line plus one `error:` line, exit 2. Ctrl-C or SIGTERM:
    128 + the signal's number. The reader of stdout leaving (`| head`): exit 0, quietly.
    A traceback only with `--debug` (anywhere on the line) or GPT2_DEBUG=1.
    """

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        if "--debug" in args[: args.index("--") if "--" in args else len(args)]:
            args.remove("--debug")
            os.environ["GPT2_DEBUG"] = "1"
        try:
            code = super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:  # bare `gpt2`: the help, and exit 0
            typer.echo(exc.ctx.get_help())
            code = 0
        except click_errors.UsageError as exc:
            if exc.ctx is not None:
                err.print(exc.ctx.get_usage(), markup=False, soft_wrap=True)
            print_error(exc.format_message())
            code = 2
        except click_errors.ClickException as exc:
            print_error(exc.format_message())
            code = exc.exit_code
        except typer.Abort:  # end of input where Click asked for one
            code = 1
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None and command.callback is not None:
            command.callback = _finite_floats(command.callback, command.params)
        return command

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:  # `gpt2 --help | head -1`
            stdout_gone()
            raise typer.Exit(0) from None

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click_errors.ClickException):  # usage errors: main()
            raise
        except BrokenPipeError:  # the reader of stdout left; that is fine
            stdout_gone()
            raise typer.Exit(0) from None
        except KeyboardInterrupt as exc:
            err.print("interrupted")
            raise typer.Exit(interrupts.exit_code(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: one line unless debugging
            if debugging():
                raise
            print_error(error_line(exc, ctx.invoked_subcommand))
            raise typer.Exit(1) from None


app = typer.Typer(
    name="gpt2",
    cls=_ErrorBoundary,
    help="A fast, faithful GPT-2 toolkit in JAX/Flax.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain Click help: no padding, no boxes, nothing cut when piped
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
app.command("serve")(serve_cmd.serve)
app.command("lens")(lens_cmd.lens)


def main() -> None:
    """Console-script entry point."""
    interrupts.install()
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # what was still buffered found the reader gone
        stdout_gone()
    sys.exit(code)
