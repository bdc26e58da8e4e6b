"""`gpt2 train`: fine-tune a model or train one from scratch; resumable, Ctrl-C safe."""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path
from typing import Annotated

import typer

from gpt2cli.cli.console import err
from gpt2cli.cli.options import Dtype
from gpt2cli.errors import UserError

# Settings that shape the numbers a run produces: fixed once the run exists.
_FIXED_ON_RESUME = (
    "dataset",
    "model",
    "init",
    "tokenizer",
    "out",
    "output",
    "val_dataset",
    "val_fraction",
    "errors",
    "eval_batches",
    "batch_size",
    "seq_length",
    "grad_accum",
    "lr",
    "min_lr",
    "warmup",
    "decay_steps",
    "weight_decay",
    "grad_clip",
    "dropout",
    "dtype",
    "seed",
)

Opt = typer.Option


def train(
    dataset: Annotated[
        list[str] | None,
        Opt(
            "--dataset",
            "-d",
            help="Text file(s) or globs (relative names are read from $DATA_DIR), or a "
            "folder made by gpt2 prepare.",
        ),
    ] = None,
    more_files: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="FILES",
            help="More dataset files (what a shell makes of --dataset corpus/*.txt).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        Opt(
            "--model",
            "-m",
            "--model-name",
            help="Starting model: a .npz, a Hugging Face folder or a Hub repo id \\[default: gpt2].",
        ),
    ] = None,
    init: Annotated[
        str | None, Opt("--init", help="Train from scratch with this preset's shape (e.g. tiny).")
    ] = None,
    tokenizer: Annotated[
        str | None, Opt("--tokenizer", help="Tokenizer folder or repo id.")
    ] = None,
    resume: Annotated[
        str | None,
        Opt("--resume", help="Continue the run in this folder exactly where it stopped."),
    ] = None,
    out: Annotated[
        str | None, Opt("--out", help="Run folder (checkpoints, metrics) \\[default: runs/<time>].")
    ] = None,
    output: Annotated[
        str | None,
        Opt(
            "--output",
            "-o",
            help="Trained model .npz \\[default: OUT/final.npz; gpt2_finetuned.npz without --out].",
        ),
    ] = None,
    force: Annotated[bool, Opt("--force", help="Overwrite an existing --output file.")] = False,
    steps: Annotated[
        int | None, Opt("--steps", help="Optimizer steps in total \\[default: 1000].")
    ] = None,
    batch_size: Annotated[
        int | None, Opt("--batch-size", "-b", help="Sequences per micro-batch \\[default: 8].")
    ] = None,
    seq_length: Annotated[
        int | None,
        Opt("--seq-length", help="Tokens per sequence \\[default: 256, or the context]."),
    ] = None,
    grad_accum: Annotated[
        int | None, Opt("--grad-accum", help="Micro-batches per optimizer step \\[default: 1].")
    ] = None,
    lr: Annotated[
        float | None, Opt("--lr", help="Peak learning rate \\[default: 5e-5; 6e-4 with --init].")
    ] = None,
    min_lr: Annotated[
        float | None, Opt("--min-lr", help="Final learning rate \\[default: lr/10].")
    ] = None,
    warmup: Annotated[
        int | None, Opt("--warmup", help="Linear warm-up steps \\[default: min(100, steps/10)].")
    ] = None,
    decay_steps: Annotated[
        int | None,
        Opt("--decay-steps", help="Step where the cosine reaches --min-lr \\[default: steps]."),
    ] = None,
    weight_decay: Annotated[
        float | None, Opt("--weight-decay", help="AdamW decay of weight matrices \\[default: 0.1].")
    ] = None,
    grad_clip: Annotated[
        float | None,
        Opt("--grad-clip", help="Global gradient-norm limit, 0 = off \\[default: 1.0]."),
    ] = None,
    dropout: Annotated[
        float | None, Opt("--dropout", help="Dropout rate in training \\[default: the model's].")
    ] = None,
    dtype: Dtype = None,
    remat: Annotated[
        bool,
        Opt("--remat", help="Recompute each block in the backward pass: less memory, slower."),
    ] = False,
    seed: Annotated[
        int | None, Opt("--seed", help="Data order, dropout and init \\[default: 0].")
    ] = None,
    val_dataset: Annotated[
        list[str] | None, Opt("--val-dataset", help="Validation text file(s) instead of a split.")
    ] = None,
    val_fraction: Annotated[
        float | None, Opt("--val-fraction", help="Tail of the data held out \\[default: 0.05].")
    ] = None,
    errors: Annotated[
        str | None, Opt("--errors", help="Non-UTF-8 bytes: strict (stop) or replace.")
    ] = None,
    eval_batches: Annotated[
        int | None, Opt("--eval-batches", help="Validation batches per evaluation \\[default: 8].")
    ] = None,
    log_every: Annotated[
        int | None, Opt("--log-every", help="Steps per log line \\[default: 10].")
    ] = None,
    eval_every: Annotated[
        int | None, Opt("--eval-every", help="Steps per validation, 0 = at the end \\[default: 0].")
    ] = None,
    save_every: Annotated[
        int | None,
        Opt("--save-every", help="Steps per checkpoint, 0 = at the end \\[default: 1000]."),
    ] = None,
    keep: Annotated[int | None, Opt("--keep", help="Checkpoints kept \\[default: 3].")] = None,
    plot: Annotated[
        bool, Opt("--plot", help="Write loss.png in the run folder at the end.")
    ] = False,
    data_parallel: Annotated[
        bool, Opt("--data-parallel", help="Split each batch over all devices.")
    ] = False,
    fsdp: Annotated[
        bool, Opt("--fsdp", help="Also shard params and optimizer state over the devices.")
    ] = False,
    coordinator: Annotated[
        str | None, Opt("--coordinator", help="HOST:PORT of process 0, for multi-process runs.")
    ] = None,
    num_processes: Annotated[int, Opt("--num-processes", help="Processes in the run.")] = 1,
    process_id: Annotated[int, Opt("--process-id", help="This process's index.")] = 0,
) -> None:
    """Fine-tune a model, or train one from scratch (--init), on text files.

    Ctrl-C finishes the current step, saves a checkpoint and tells you how to resume.

    Examples:

      gpt2 train --dataset train.txt --steps 10

      gpt2 train --dataset 'corpus/*.txt' --model gpt2.npz --steps 2000 --out runs/ft

      gpt2 train --dataset tiny.txt --init tiny --steps 300 --out runs/scratch

      gpt2 prepare 'corpus/*.txt' --out data/corpus && gpt2 train --dataset data/corpus --init tiny

      gpt2 train --resume runs/ft --steps 4000
    """
    given = dict(locals())
    if errors not in (None, "strict", "replace"):
        raise UserError(f"--errors must be strict or replace, got {errors!r}")
    if model and init:
        raise UserError("give either --model (fine-tune) or --init (from scratch), not both")
    if data_parallel and fsdp:
        raise UserError("--fsdp already splits the batch over the devices; drop --data-parallel")
    if (num_processes > 1) != (coordinator is not None):
        raise UserError("a multi-process run needs both --coordinator and --num-processes > 1")
    if num_processes > 1 and not (out or resume):
        raise UserError("a multi-process run needs --out (every process must name the same folder)")
    if resume:
        fixed = [name for name in _FIXED_ON_RESUME if given[name] not in (None, [])]
        if more_files:
            fixed.append("dataset")
        if fixed:
            flag = "--" + fixed[0].replace("_", "-")
            raise UserError(
                f"{flag} cannot be combined with --resume: a resumed run keeps its settings "
                f"(see {Path(resume) / 'run.json'}); start a new run to change them"
            )
    elif not (dataset or more_files):
        raise UserError("give the text to train on with --dataset FILE (or --resume a run)")

    if plot and importlib.util.find_spec("matplotlib") is None:
        raise UserError(
            "--plot needs matplotlib: install it (uv pip install matplotlib) or drop --plot"
        )
    if coordinator:
        from gpt2cli.sharding import init_distributed

        init_distributed(coordinator, num_processes, process_id)
    parallel = "fsdp" if fsdp else "data-parallel" if (data_parallel or num_processes > 1) else None

    from gpt2cli import train_run

    if resume:
        overrides = {
            "steps": steps,
            "log_every": log_every,
            "eval_every": eval_every,
            "save_every": save_every,
            "keep": keep,
            "parallel": parallel,
        }
        plan = train_run.resume_plan(resume, overrides)
    else:
        from gpt2cli.cli.options import DEFAULT_MODEL
        from gpt2cli.hub import load_model

        model = model if (model or init) else DEFAULT_MODEL
        model_config, start_params = train_run.source_config(model, init, load_model)
        request = train_run.NewRun(
            dataset=list(dataset or []) + list(more_files or []),
            model=None if init else model,
            init=init,
            tokenizer=tokenizer,
            out=out,
            output=output,
            val_dataset=val_dataset,
            val_fraction=val_fraction,
            errors=errors or "strict",
            eval_batches=8 if eval_batches is None else eval_batches,
            steps=1000 if steps is None else steps,
            log_every=10 if log_every is None else log_every,
            eval_every=0 if eval_every is None else eval_every,
            save_every=1000 if save_every is None else save_every,
            keep=3 if keep is None else keep,
            train={
                "batch_size": batch_size,
                "seq_length": seq_length,
                "grad_accum": grad_accum,
                "lr": lr,
                "min_lr": min_lr,
                "warmup": warmup,
                "decay_steps": decay_steps,
                "weight_decay": weight_decay,
                "grad_clip": grad_clip,
                "dropout": dropout,
                "dtype": dtype,
                "remat": remat or None,
                "seed": seed,
                "parallel": parallel or "single",
            },
        )
        plan = train_run.new_plan(request, model_config, force=force, main_process=_is_main())
        plan.start_params, start_params = start_params, None
    _run(plan, force=force or bool(resume), plot=plot)


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

    stop = _Interrupt()
    reporter = _Reporter(folder, loop.steps, start, main_process, save)
    steps_done = 0

    def should_stop() -> bool:
        """Processes agree at each log step, so all of them stop after the same step."""
        nonlocal steps_done
        steps_done += 1
        if jax.process_count() == 1:
            return stop.requested()
        return steps_done % loop.log_every == 0 and any_process(stop.requested())

    what = "resuming" if plan.resumed else "training"
    err.print(
        f"{what} {source['source'] or 'a fresh ' + source['init']} "
        f"({config.num_params() / 1e6:.1f}M params) in {folder.path} from step {start} "
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
        raise typer.Exit(130)
    if main_process:
        params = to_host(state.params)
        written = save_npz(plan.output, config, params, force=force)
        err.print(f"wrote {written}")
        if plot:
            err.print(f"wrote {folder.plot()}")
    else:
        to_host(state.params)


class _Interrupt:
    """Ctrl-C asks the loop to stop after the current step; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self._flag = False
        self._previous = None

    def requested(self) -> bool:
        return self._flag

    def _handle(self, signum, frame) -> None:
        if self._flag:
            raise KeyboardInterrupt
        self._flag = True
        err.print("Ctrl-C: finishing this step and saving (press again to abort without saving)")

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


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
