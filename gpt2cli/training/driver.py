"""The run driver: a planned run from its data to its trained model file.

It loads the data, builds the trainer and the state (fresh, loaded or resumed), checks that
the run fits in memory, runs the loop with checkpoints and metrics, turns a diverged loss into
one line, and writes the final file. It draws nothing: the command renders through a `View`.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gpt2cli.errors import ParameterError, UserError
from gpt2cli.training import memory
from gpt2cli.training.plan import Plan, initial_weights, load_data, start_folder


class StepView(Protocol):
    def log(self, record: dict) -> None: ...
    def saved(self, path: Path) -> None: ...


class View(Protocol):
    """How the command shows a run (all on the main process only)."""

    def say(self, line: str) -> None: ...
    def tokenizing(self) -> AbstractContextManager[Any]: ...  # yields progress(done, total)
    def busy(self, what: str) -> AbstractContextManager[None]: ...  # a status line meanwhile
    def steps(self, total: int, start: int) -> AbstractContextManager[StepView]: ...
    def stopping(self) -> AbstractContextManager[Any]: ...  # yields stop_requested() -> bool


@dataclass(frozen=True)
class Outcome:
    start: int
    step: int  # the step the run stopped at
    steps: int  # the step it was asked to reach
    folder: Path
    written: Path | None = None  # the final model file (main process)
    plot: Path | None = None

    @property
    def finished(self) -> bool:
        return self.step >= self.steps


def run(plan: Plan, view: View, *, force: bool, plot: bool, tqdm_class=None) -> Outcome:
    """Train until the plan's step count, or until the view's stop request says so.
    `tqdm_class` draws a Hub download (see hub.resolve)."""
    import functools

    import jax

    from gpt2cli import compile_cache
    from gpt2cli.checkpoint import save_npz
    from gpt2cli.hub import load_model, load_tokenizer
    from gpt2cli.training.loop import Diverged, train_loop
    from gpt2cli.training.probes import Probes
    from gpt2cli.training.sharding import any_process, to_host
    from gpt2cli.training.trainer import Trainer

    compile_cache.enable()
    main = jax.process_index() == 0
    view = view if main else _Silent(view)
    source = plan.settings.model
    tokenizer = load_tokenizer(source.tokenizer, source.model, tqdm_class=tqdm_class)
    _check_vocab(plan, tokenizer.vocab_size)
    probes = Probes(
        plan.settings.loop, plan.model_config, tokenizer, source.dtype
    )  # reads the task
    with view.tokenizing() as progress:
        data = load_data(plan, tokenizer, progress)
    trainer = Trainer.cached(plan.model_config, plan.train_config)
    fits = check_fits(plan, trainer.loss_chunks)  # before any weights reach the device
    with view.busy(
        f"placing {plan.model_config.num_params() / 1e6:.1f}M parameters and the optimizer state"
    ):
        if plan.start_params is not None:
            state = trainer.fresh_state(plan.start_params)
            plan.start_params = None  # the device holds them now; free the host copy
        else:
            load = functools.partial(load_model, tqdm_class=tqdm_class)
            state = initial_weights(plan, trainer, load)
    start = int(jax.device_get(state.step))
    loop = plan.settings.loop
    if loop.steps < start:
        raise ParameterError("steps", f"{loop.steps} is below the run's step {start}; give more")
    if main:
        start_folder(plan)
        if plan.resumed:
            plan.folder.truncate_metrics(start)
            plan.folder.remove_partial()
    view.say(fits)
    folder, config = plan.folder, trainer.model_config

    def save(state, step) -> Path | None:
        params, opt_state = to_host((state.params, state.opt_state))  # all processes take part
        return folder.save(step, config, params, opt_state, loop.keep) if main else None

    steps_done, stop_requested = 0, None

    def should_stop() -> bool:
        """Processes agree at each log step, so all of them stop after the same step."""
        nonlocal steps_done
        steps_done += 1
        if jax.process_count() == 1:
            return stop_requested()
        return steps_done % loop.log_every == 0 and any_process(stop_requested())

    what = "resuming" if plan.resumed else "training"
    view.say(
        f"{what} {source.model or 'a fresh ' + source.init} ({config.n_layer} layers, "
        f"{config.n_head} heads, width {config.n_embd}, context {config.n_positions}: "
        f"{config.num_params() / 1e6:.1f}M params) in {folder.path} from step {start} "
        f"to {loop.steps}; {data.describe()}"
    )
    try:
        with view.stopping() as stop_requested, view.steps(loop.steps, start) as steps:
            hooks = _Hooks(folder, view, steps, save, main, probes, trainer.model_params)
            state, step = train_loop(trainer, state, data, loop, hooks, should_stop)
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
            view.say(f"saved checkpoint {path}")
    outcome = Outcome(start, step, loop.steps, folder.path)
    if step < loop.steps:  # stopped early: the caller says how to go on
        return outcome
    params = to_host(state.params)  # all processes take part
    if not main:
        return outcome
    if trainer.lora is not None:
        from gpt2cli.adapter import save_adapter

        base = source.model or source.init
        written = save_adapter(plan.output, trainer.lora, params, base=base, force=force)
    else:
        written = save_npz(plan.output, config, params, force=force)
    return Outcome(start, step, loop.steps, folder.path, written, folder.plot() if plot else None)


def _check_vocab(plan: Plan, tokens: int) -> None:
    """A model must have a row for every token its tokenizer makes (a smaller vocab_size trains
    on ids past its embedding table: NaN)."""
    vocab = plan.model_config.vocab_size
    if vocab < tokens:
        source = plan.settings.model.init or plan.settings.model.model
        raise UserError(
            f"{source}: vocab_size {vocab} is below the tokenizer's {tokens} tokens; give a "
            f"vocab_size of at least {tokens}"
        )


def check_fits(plan: Plan, loss_chunks: int = 1) -> str:
    """The line that says what the run will hold against what the device has; a UserError,
    with what to change, when it cannot fit."""
    import jax
    import jax.numpy as jnp

    from gpt2cli import precision
    from gpt2cli.lora import count

    tc = plan.train_config
    parallel = tc.parallel != "single"
    devices = jax.device_count() if parallel else 1
    need = memory.footprint(
        plan.model_config,
        rows=max(1, tc.batch_size // devices),
        seq=tc.seq_length,
        compute_bytes=jnp.dtype(precision.get(tc.dtype).compute).itemsize,
        grad_accum=tc.grad_accum,
        remat=tc.remat,
        shards=devices if tc.parallel == "fsdp" else 1,
        loss_chunks=loss_chunks,
        trained=None if tc.lora is None else count(tc.lora, plan.model_config),
    )
    have, what = memory.device_capacity()
    if have is None:
        return f"memory: {need.describe()}"
    fixed = need.params + need.optimizer + need.gradients
    lora = "--lora (train adapters on the frozen model, not every weight)"
    if fixed > have:  # no batch fits: a new model's shape, or a loaded one's AdamW, is too big
        fine_tune = tc.lora is None and not plan.settings.model.init
        raise UserError(
            f"this model's weights, optimizer state and gradients alone need {fixed / memory.GB:.1f}"
            f" GB but the machine has {have / memory.GB:.1f} GB ({what}): "
            + (f"try {lora}" if fine_tune else memory.largest_part(plan.model_config))
        )
    if need.total > have:
        remedies = [f"a smaller --batch-size (now {tc.batch_size}) with more --grad-accum"]
        if tc.lora is None:  # first where AdamW's state outweighs the batch's activations
            at = 0 if need.optimizer + need.gradients > need.activations else len(remedies)
            remedies.insert(at, lora)
        if not tc.remat:
            remedies.append("--remat")
        if tc.dtype == "float32":
            remedies.append("--dtype bfloat16")
        raise UserError(
            f"this run needs at least {need.describe()} but has {have / memory.GB:.1f} GB "
            f"({what}): try {', or '.join(remedies)}"
        )
    return f"memory: {need.describe()} of {have / memory.GB:.1f} GB {what}"


class _Hooks:
    """The loop's hooks: metrics.jsonl, checkpoints and probes, shown through the view."""

    def __init__(
        self, folder, view: View, steps: StepView, save, main: bool, probes, model_params
    ) -> None:
        self.folder, self.view, self.steps, self._save, self.main = folder, view, steps, save, main
        self.probes, self.model_params = probes, model_params  # the whole model of what trains

    def on_log(self, record: dict) -> None:
        if self.main:
            self.folder.append_metrics(record)
            self.steps.log(record)

    def on_save(self, state, step: int) -> None:
        path = self._save(state, step)
        if path:
            self.steps.saved(path)

    def measure(self, params, step: int, evaluating: bool) -> dict:
        if not self.probes.due(step, evaluating):
            return {}
        from gpt2cli.training.sharding import to_host

        full = to_host(self.model_params(params))  # all processes take part
        return self.probes.measure(full, step, evaluating)

    @contextmanager
    def compiling(self, what: str):
        """A status line while XLA compiles, then how long it took."""
        started = time.perf_counter()
        with self.view.busy(f"compiling the {what} (XLA, once per shape; cached for next time)"):
            yield
        self.view.say(f"compiled the {what} in {time.perf_counter() - started:.1f} s")


class _Silent:
    """The view of the processes other than the main one: they show nothing."""

    def __init__(self, view: View) -> None:
        self._stop = view.stopping()  # every process stops on a signal

    def say(self, line: str) -> None:
        pass

    def tokenizing(self):
        return nullcontext(lambda done, total: None)

    def busy(self, what: str):
        return nullcontext()

    def steps(self, total: int, start: int):
        return nullcontext(self)

    def stopping(self):
        return self._stop

    def log(self, record: dict) -> None:
        pass

    def saved(self, path: Path) -> None:
        pass
