"""`gpt2 train`: fine-tune a model or train one from scratch; resumable, Ctrl-C safe."""

from __future__ import annotations

import importlib.util
import inspect
import signal
import typing
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

      gpt2 train --dataset train.txt --steps 10

      gpt2 train --dataset 'corpus/*.txt' --model gpt2.npz --steps 2000 --out runs/ft

      gpt2 train --dataset tiny.txt --init tiny --n-layer 4 --n-embd 128 --steps 300 --out runs/scratch

      gpt2 prepare 'corpus/*.txt' --out data/corpus && gpt2 train --dataset data/corpus --init tiny

      gpt2 train --init tiny --dataset tiny.txt --print-config > run.toml; gpt2 train --config run.toml

      gpt2 train --resume runs/ft --steps 4000
    """
    from gpt2cli.training import config_file
    from gpt2cli.training import settings as S

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
            "--plot needs matplotlib: install it (uv pip install matplotlib) or drop --plot"
        )
    if resume:
        plan = _resume(resume, values, force)
        if print_config:
            _close(plan)
            typer.echo(config_file.dumps(S.Settings.from_flat(plan.spec["settings"])))
            return
    else:
        settings = _check(S.Settings.from_flat(values))
        if print_config:
            typer.echo(config_file.dumps(_resolved_cheaply(settings)))
            return
        plan = _new(settings, force)
    try:
        _run(plan, force=force or (plan.resumed and plan.owns_output), plot=plan.settings.loop.plot)
    finally:
        _close(plan)


def _close(plan) -> None:
    from gpt2cli import train_run

    train_run.close(plan)


def _command_parameters() -> list[inspect.Parameter]:
    """The command's flags: one per setting (training/settings.py), plus the actions."""
    from gpt2cli.training import settings as S

    def option(name: str, kind, default, *names: str, help: str) -> inspect.Parameter:
        info = Opt(default, *names, help=help.replace("[", "\\["), show_default=False)
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
    for name, (_, f) in S.FIELDS.items():
        kind = S.field_type(name)
        optional = kind if type(None) in typing.get_args(kind) else kind | None
        default = S.default_of(name)
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
                S.flag(name),
                *f.metadata["aliases"],
                help=f.metadata["help"] + shown,
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


train.__signature__ = inspect.Signature(_command_parameters())


def _check(s) -> object:
    """Conflicting or missing flags, before any work starts."""
    from gpt2cli import precision
    from gpt2cli.config import SHAPE_FIELDS
    from gpt2cli.training.settings import flag

    m, p = s.model, s.parallel
    if m.dtype not in precision.NAMES:
        raise UserError(f"--dtype must be one of {', '.join(precision.NAMES)}, got {m.dtype!r}")
    if s.data.errors not in ("strict", "replace"):
        raise UserError(f"--errors must be strict or replace, got {s.data.errors!r}")
    if m.model and m.init:
        raise UserError("give either --model (fine-tune) or --init (from scratch), not both")
    shaped = [name for name in SHAPE_FIELDS if getattr(m, name) is not None]
    if shaped and not m.init:
        raise UserError(
            f"{flag(shaped[0])} shapes a new model: add --init PRESET (a loaded model keeps its shape)"
        )
    if p.data_parallel and p.fsdp:
        raise UserError("--fsdp already splits the batch over the devices; drop --data-parallel")
    if (p.num_processes > 1) != (p.coordinator is not None):
        raise UserError("a multi-process run needs both --coordinator and --num-processes > 1")
    if p.num_processes > 1 and not s.loop.out:
        raise UserError("a multi-process run needs --out (every process must name the same folder)")
    if not s.data.dataset:
        raise UserError("give the text to train on with --dataset FILE (or --resume a run)")
    return s


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
        from gpt2cli.sharding import init_distributed

        init_distributed(parallel.coordinator, parallel.num_processes, parallel.process_id)


def _new(s, force: bool):
    from gpt2cli import train_run
    from gpt2cli.cli.options import DEFAULT_MODEL
    from gpt2cli.config import SHAPE_FIELDS
    from gpt2cli.hub import load_model

    _start_processes(s.parallel)
    if not s.model.init and not s.model.model:
        s = s.replace(model=DEFAULT_MODEL)
    shape = {k: getattr(s.model, k) for k in SHAPE_FIELDS}
    model_config, start_params = train_run.source_config(
        s.model.model, s.model.init, load_model, shape
    )
    plan = train_run.new_plan(s, model_config, force=force, main_process=_is_main())
    plan.start_params = start_params
    return plan


def _resume(path: str, values: dict, force: bool):
    """The run in `path`; only the settings that do not change its numbers may be given."""
    from gpt2cli import train_run
    from gpt2cli.training import settings as S

    recorded = train_run.recorded_settings(path)
    changed = [
        name
        for name in S.fixed_names()
        if name in values
        and (recorded is None or not _same(name, values[name], recorded.get(name)))
    ]
    if changed:
        raise UserError(
            f"{S.flag(changed[0])} cannot be combined with --resume: a resumed run keeps its settings "
            f"(see {Path(path) / 'run.json'}); start a new run to change them"
        )
    overrides = {name: value for name, value in values.items() if name not in S.fixed_names()}
    parallel = S.Settings.from_flat({**(recorded or {}), **overrides}).parallel
    _start_processes(parallel)
    return train_run.resume_plan(path, overrides, force=force, main_process=_is_main())


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _run(plan, force: bool, plot: bool) -> None:
    import jax

    from gpt2cli import compile_cache, train_run
    from gpt2cli.checkpoint import save_npz
    from gpt2cli.hub import load_model, load_tokenizer
    from gpt2cli.sharding import any_process, to_host
    from gpt2cli.train import Diverged, Trainer, train_loop

    compile_cache.enable()
    main_process = jax.process_index() == 0
    source = plan.spec["model"]
    tokenizer = load_tokenizer(plan.spec["tokenizer"], source["source"])
    with _progress_bar("tokenizing") as (progress, task):
        data = train_run.load_data(
            plan, tokenizer, lambda done, total: progress.update(task, completed=done, total=total)
        )
    trainer = Trainer.cached(plan.model_config, plan.train_config)
    if plan.start_params is not None:
        state = trainer.create_state(plan.start_params)
        plan.start_params = None  # the device holds them now; free the host copy
    else:
        state = train_run.initial_weights(plan, trainer, load_model)
    start = int(jax.device_get(state.step))
    if plan.loop.steps < start:
        raise UserError(f"--steps {plan.loop.steps} is below the run's step {start}; give more")
    if main_process:
        train_run.start_folder(plan)
        if plan.resumed:
            plan.folder.truncate_metrics(start)
            plan.folder.remove_partial()
    folder, loop = plan.folder, plan.loop
    config = trainer.model_config

    def save(state, step) -> Path | None:
        params, opt_state = to_host((state.params, state.opt_state))  # all processes take part
        if main_process:
            return folder.save(step, config, params, opt_state, plan.keep)
        return None

    stop = StopRequest(_say_stopping, second_aborts=True)
    reporter = _Reporter(folder, loop.steps, start, main_process, save)
    steps_done = 0

    def should_stop() -> bool:
        """Processes agree at each log step, so all of them stop after the same step."""
        nonlocal steps_done
        steps_done += 1
        if jax.process_count() == 1:
            return stop.hit
        return steps_done % loop.log_every == 0 and any_process(stop.hit)

    what = "resuming" if plan.resumed else "training"
    err.print(
        f"{what} {source['source'] or 'a fresh ' + source['init']} ({config.n_layer} layers, "
        f"{config.n_head} heads, width {config.n_embd}, context {config.n_positions}: "
        f"{config.num_params() / 1e6:.1f}M params) in {folder.path} from step {start} "
        f"to {loop.steps}; {len(data.train)} train blocks of {data.train.seq} tokens"
    )
    try:
        with stop, reporter:
            state, step = train_loop(trainer, state, data, loop, reporter, should_stop)
    except Diverged as exc:
        last = folder.latest()
        kept = (
            f"the last good checkpoint is {last[1]} (step {last[0]})"
            if last
            else "no checkpoint was saved"
        )
        raise UserError(f"{exc}; stopped: {kept}. Try a lower --lr in a new run.") from None

    if step > start or not folder.latest():
        path = save(state, step)
        if path:
            err.print(f"saved checkpoint {path}")
    if step < loop.steps:  # stopped early by Ctrl-C
        err.print(
            f"stopped at step {step} of {loop.steps}. Continue with: gpt2 train --resume {folder.path}"
        )
        raise typer.Exit(stop.exit_code)
    if main_process:
        params = to_host(state.params)
        written = save_npz(plan.output, config, params, force=force)
        err.print(f"wrote {written}")
        if plot:
            err.print(f"wrote {folder.plot()}")
    else:
        to_host(state.params)


def _say_stopping(signum: int) -> None:
    what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    err.print(
        f"{what}: finishing this step and saving (press Ctrl-C again to abort without saving)"
    )


class _Reporter:
    """Loop hooks: a progress bar with the latest figures, metrics.jsonl, and checkpoints."""

    def __init__(self, folder, steps: int, start: int, main_process: bool, save) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.folder, self.main, self._save = folder, main_process, save
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[fields]}"),
            TimeRemainingColumn(),
            console=err,
            transient=not err.is_terminal,  # logs get the plain lines printed by on_log
        )
        self.task = self.progress.add_task("train", total=steps, completed=start, fields="")
        self.val = None

    def __enter__(self):
        if self.main:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def on_log(self, record: dict) -> None:
        if not self.main:
            return
        self.folder.append_metrics(record)
        self.val = record.get("val_loss", self.val)
        parts = []
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if self.val is not None:
            parts.append(f"val {self.val:.4f}")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        line = "  ".join(parts)
        self.progress.update(self.task, completed=record["step"], fields=line)
        if not err.is_terminal:
            err.print(f"step {record['step']}  {line}")

    def on_save(self, state, step: int) -> None:
        path = self._save(state, step)
        if path:
            self.progress.console.print(f"saved checkpoint {path}")


class _progress_bar:
    """A transient bar for tokenizing; yields (progress, task)."""

    def __init__(self, description: str) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn(description), BarColumn(), DownloadColumn(), console=err, transient=True
        )
        self.task = self.progress.add_task(description, total=None)

    def __enter__(self):
        self.progress.start()
        return self.progress, self.task

    def __exit__(self, *exc) -> None:
        self.progress.stop()
