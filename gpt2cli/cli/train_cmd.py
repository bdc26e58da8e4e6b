"""`gpt2 train`: fine-tune a model or train one from scratch; resumable, Ctrl-C safe."""

from __future__ import annotations

import importlib.util
import inspect
import json
import signal
import typing
from contextlib import contextmanager
from pathlib import Path

import typer

from gpt2cli.cli.console import err
from gpt2cli.cli.interrupts import StopRequest
from gpt2cli.errors import UserError

Opt = typer.Option


def train(**given) -> None:
    """Fine-tune a model, or train one from scratch (--init), on text files or a prepared folder.

    Every flag can also come from a TOML file (--config; flags win); --print-config prints the
    resolved settings as one. Ctrl-C finishes the current step, saves a checkpoint and tells
    you how to resume.

    Examples:

    \b
      gpt2 train --dataset train.txt --steps 10
      gpt2 train --dataset 'corpus/*.txt' --model gpt2.npz --steps 2000 --out runs/ft
      gpt2 train --dataset tiny.txt --init tiny --n-layer 4 --n-embd 128 --steps 300 --out runs/scratch
      gpt2 prepare 'corpus/*.txt' --out data/corpus && gpt2 train --dataset data/corpus --init tiny
      gpt2 train --init tiny --dataset tiny.txt --print-config > run.toml; gpt2 train --config run.toml
      gpt2 train --resume runs/ft --steps 4000
      gpt2 train --dataset chats.jsonl -m gpt2.npz --mask-prompt --steps 500 --out runs/sft
      gpt2 train --dataset chats.jsonl -m gpt2-xl --lora --lora-rank 16 --mask-prompt --out runs/xl-lora
    """
    from gpt2cli.cli.options import flags_for
    from gpt2cli.training import settings

    with flags_for(settings.FIELDS):
        _train(**given)


def _train(**given) -> None:
    from gpt2cli.training import config_file, settings

    resume, config, print_config = (
        given.pop("resume"),
        given.pop("config"),
        given.pop("print_config"),
    )
    force, more_files = given.pop("force"), given.pop("more_files")
    values = config_file.read(config) if config else {}
    values.update({name: value for name, value in given.items() if value is not None})
    if more_files:
        values["dataset"] = [*values.get("dataset", []), *more_files]
    if values.get("plot") and importlib.util.find_spec("matplotlib") is None:
        raise UserError(
            "--plot needs matplotlib, in the plot extra: uv pip install 'gpt2cli[plot]' "
            "(or: uv tool install '.[plot]', pipx inject gpt2cli matplotlib); or drop --plot"
        )
    if resume:
        plan = _resume(resume, values, force)
        if print_config:
            _close(plan)
            typer.echo(config_file.dumps(plan.settings))
            return
    else:
        s = _check(settings.Settings.from_flat(values))
        if print_config:  # what was given; derived values as comments, derived again on reading
            typer.echo(config_file.dumps(s, _resolved_cheaply(s)))
            return
        plan = _new(s, force)
    try:
        _run(plan, force=force or (plan.resumed and plan.owns_output), plot=plan.settings.loop.plot)
    finally:
        _close(plan)


def _close(plan) -> None:
    from gpt2cli.training.plan import close

    close(plan)


def _command_parameters() -> list[inspect.Parameter]:
    """The command's flags: one per setting (training/settings.py), plus the actions."""
    from gpt2cli.training import settings

    def option(name: str, kind, default, *names: str, help: str, callback=None):
        info = Opt(default, *names, help=help, show_default=False, callback=callback)  # no markup
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind
        )

    params = [
        inspect.Parameter(
            "more_files",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=list[str] | None,
            default=typer.Argument(
                None,
                metavar="FILES",
                help="More dataset files (what a shell makes of --dataset corpus/*.txt).",
                show_default=False,
            ),
        )
    ]
    for name, (_, f) in settings.FIELDS.items():
        kind = settings.field_type(name)
        optional = kind if type(None) in typing.get_args(kind) else kind | None
        default = settings.default_of(name)
        shown = (
            ""
            if default in (None, []) or "[default" in f.metadata["help"]
            else f" [default: {default}]"
        )
        params.append(
            option(
                name,
                optional,
                None,
                settings.flag(name),
                *f.metadata["aliases"],
                help=f.metadata["help"] + shown,
                callback=_in_range(name),
            )
        )
    params += [
        option(
            "resume",
            str | None,
            None,
            "--resume",
            help="Continue the run in this folder exactly where it stopped.",
        ),
        option(
            "config",
            str | None,
            None,
            "--config",
            help="Read settings from this TOML file (flags override it).",
        ),
        option(
            "print_config",
            bool,
            False,
            "--print-config",
            help="Print the resolved settings as TOML and exit.",
        ),
        option("force", bool, False, "--force", help="Overwrite an existing --output file."),
    ]
    return params


def _in_range(name: str):
    """A flag's callback: the setting's own range check, a usage error (exit 2) when outside."""
    from gpt2cli.errors import ParameterError
    from gpt2cli.training import settings

    def callback(value):
        try:
            settings.check_range(name, value)
        except ParameterError as exc:
            raise typer.BadParameter(exc.problem, param_hint=settings.flag(name)) from None
        return value

    return callback


train.__signature__ = inspect.Signature(_command_parameters())


def _check(s) -> object:
    """Conflicting or missing flags, before any work starts."""
    from gpt2cli import precision
    from gpt2cli.config import SHAPE_FIELDS
    from gpt2cli.training.settings import check_text_errors, default_of, flag, flat_names

    m, p = s.model, s.parallel
    precision.get(m.dtype)
    check_text_errors(s.data.errors)
    _check_together(s)
    if m.model and m.init:
        raise UserError("give either --model (fine-tune) or --init (from scratch), not both")
    shaped = [name for name in SHAPE_FIELDS if getattr(m, name) is not None]
    if shaped and not m.init:
        raise UserError(
            f"{flag(shaped[0])} shapes a new model: add --init PRESET (a loaded model keeps its shape)"
        )
    given = s.flat()
    lora_only = [n for n in flat_names("lora") if n != "lora" and given[n] != default_of(n)]
    if lora_only and not s.lora.lora:
        raise UserError(f"{flag(lora_only[0])} only applies with --lora: add it, or drop the flag")
    if p.data_parallel and p.fsdp:
        raise UserError("--fsdp already splits the batch over the devices; drop --data-parallel")
    if (p.num_processes > 1) != (p.coordinator is not None):
        raise UserError("a multi-process run needs both --coordinator and --num-processes > 1")
    if p.num_processes > 1 and not s.loop.out:
        raise UserError("a multi-process run needs --out (every process must name the same folder)")
    if not s.data.dataset:
        raise UserError("give the text to train on with --dataset FILE (or --resume a run)")
    return s


def _check_together(s) -> None:
    """The ranges that depend on another setting, as usage errors."""
    from gpt2cli.cli.options import usage_error
    from gpt2cli.errors import ParameterError
    from gpt2cli.training.settings import check_together, flag

    try:
        check_together(s)
    except ParameterError as exc:
        raise usage_error(flag(exc.name), exc.problem) from None


def _resolved_cheaply(s):
    """The settings with what can be derived without loading weights (--print-config)."""
    from gpt2cli.config import SHAPE_FIELDS, new_model_config
    from gpt2cli.training.settings import resolve

    config = None
    if s.model.init:
        config = new_model_config(s.model.init, **{k: getattr(s.model, k) for k in SHAPE_FIELDS})
    return resolve(s, config)


def _same(name: str, given, recorded) -> bool:
    """Whether a setting given on --resume is the run's own (paths compare resolved)."""
    if name in ("out", "output") and given and recorded:
        return Path(given).resolve() == Path(recorded).resolve()
    return given == recorded


def _start_processes(parallel) -> None:
    if parallel.coordinator:
        from gpt2cli.training.sharding import init_distributed

        init_distributed(parallel.coordinator, parallel.num_processes, parallel.process_id)


def _new(s, force: bool):
    import functools

    from gpt2cli.cli.options import DEFAULT_MODEL
    from gpt2cli.config import SHAPE_FIELDS
    from gpt2cli.hub import load_model
    from gpt2cli.progress import hub_progress_class
    from gpt2cli.training.plan import new_plan, source_config

    _start_processes(s.parallel)
    if not s.model.init and not s.model.model:
        s = s.replace(model=DEFAULT_MODEL)
    shape = {k: getattr(s.model, k) for k in SHAPE_FIELDS}
    load = functools.partial(load_model, tqdm_class=hub_progress_class())
    model_config, start_params = source_config(s.model.model, s.model.init, load, shape)
    plan = new_plan(s, model_config, force=force, main_process=_is_main())
    plan.start_params = start_params
    return plan


def _resume(path: str, values: dict, force: bool):
    """The run in `path`; only the settings that do not change its numbers may be given."""
    from gpt2cli.training import settings
    from gpt2cli.training.plan import recorded_settings, resume_plan

    recorded = recorded_settings(path)
    fixed = settings.fixed_names()
    changed = [
        name
        for name in fixed
        if name in values and not _same(name, values[name], recorded.flat()[name])
    ]
    if changed:
        raise UserError(
            f"{settings.flag(changed[0])} cannot be combined with --resume: a resumed run keeps "
            f"its settings (see {Path(path) / 'run.json'}); start a new run to change them"
        )
    overrides = {name: value for name, value in values.items() if name not in fixed}
    resumed = recorded.replace(**overrides)
    _check_together(resumed)
    _start_processes(resumed.parallel)
    return resume_plan(path, overrides, force=force, main_process=_is_main())


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _run(plan, force: bool, plot: bool) -> None:
    from gpt2cli.progress import hub_progress_class
    from gpt2cli.training.driver import run

    view = _View()
    outcome = run(plan, view, force=force, plot=plot, tqdm_class=hub_progress_class())
    if not outcome.finished:
        err.print(
            f"stopped at step {outcome.step} of {outcome.steps}. "
            f"Continue with: gpt2 train --resume {outcome.folder}"
        )
        raise typer.Exit(view.stop.exit_code)
    for path in (outcome.written, outcome.plot):
        if path:
            err.print(f"wrote {path}")


def _say_stopping(signum: int) -> None:
    what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    err.print(
        f"{what}: finishing this step and saving (press Ctrl-C again to abort without saving)"
    )


class _View:
    """How a run looks on stderr: bars for tokenizing and steps, a status while compiling."""

    def __init__(self) -> None:
        self.stop = StopRequest(_say_stopping, second_aborts=True)

    def say(self, line: str) -> None:
        err.print(line, soft_wrap=True)

    @contextmanager
    def stopping(self):
        with self.stop:
            yield lambda: self.stop.hit

    @contextmanager
    def tokenizing(self):
        from gpt2cli.progress import bytes_progress

        with bytes_progress(err) as progress:
            task = progress.add_task("tokenizing", total=None)
            yield lambda done, total: progress.update(task, completed=done, total=total)

    def busy(self, what: str):
        return err.status(what)

    def steps(self, total: int, start: int):
        return _Steps(total, start)


class _Steps:
    """A progress bar with the latest figures; plain lines where stderr is not a terminal."""

    def __init__(self, steps: int, start: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[fields]}"),
            TimeRemainingColumn(),
            console=err,
            disable=not err.is_terminal,  # logs get the plain lines printed by log()
        )
        self.task = self.progress.add_task("train", total=steps, completed=start, fields="")
        self.val = self.acc_norm = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def log(self, record: dict) -> None:
        self.val = record.get("val_loss", self.val)
        self.acc_norm = record.get("task_acc_norm", self.acc_norm)
        parts = []
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if self.val is not None:
            parts.append(f"val {self.val:.4f}")
        if self.acc_norm is not None:
            parts.append(f"acc_norm {self.acc_norm:.3f}")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        line = "  ".join(parts)
        self.progress.update(self.task, completed=record["step"], fields=line)
        if not err.is_terminal:
            err.print(f"step {record['step']}  {line}")
        if "sample" in record:  # one line: JSON's quotes show where it starts and ends
            self.progress.console.print(
                f"step {record['step']} sample: {json.dumps(record['sample'])}",
                soft_wrap=True,
                markup=False,
                highlight=False,
            )

    def saved(self, path: Path) -> None:
        self.progress.console.print(f"saved checkpoint {path}")
