"""The training loop, host side: each process's view of the data, a prefetch thread, and the
loop that runs the trainer's steps.

The loop is UI-free: it reports through a `Hooks` object (log lines, evaluations, saves) and
asks `should_stop()` after every step, which is how the CLI's Ctrl-C handler stops it cleanly.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import numpy as np

from gpt2cli.errors import UserError
from gpt2cli.training.data import Blocks, Sampler, batch_for_step, rows_of, val_batches
from gpt2cli.training.examples import Examples, bucket, gather
from gpt2cli.training.settings import DataSettings, LoopSettings
from gpt2cli.training.trainer import Trainer, TrainState

# ---- data as the loop sees it ----------------------------------------------------------


@dataclass(frozen=True)
class TrainData:
    """Train and validation blocks plus the sampler; slices out this process's rows."""

    train: Blocks
    val: Blocks | None
    sampler: Sampler
    rows: int
    accum: int
    eval_batches: int = DataSettings.eval_batches

    @property
    def tokens_per_step(self) -> int:
        return self.rows * self.accum * self.train.seq

    @staticmethod
    def _part() -> tuple[int, int]:
        return jax.process_index(), jax.process_count()

    def batch(self, step: int) -> np.ndarray:
        """This process's rows of step `step`'s [accum, rows, T+1] batch (only those are read)."""
        return batch_for_step(self.train, self.sampler, step, self.rows, self.accum, self._part())

    def validation(self) -> list[np.ndarray]:
        if self.val is None:
            return []
        return [b[None] for b in val_batches(self.val, self.rows, self.eval_batches, self._part())]

    def describe(self) -> str:
        return f"{len(self.train)} train blocks of {self.train.seq} tokens"


@dataclass(frozen=True)
class ExampleData:
    """Examples of their own (instruction or chat rows), as TrainData: a step's batch is a
    (tokens [accum, rows, L+1], weights [accum, rows, L]) pair, L the length bucket of the
    step's longest example (the same for every process), at most `seq`."""

    train: Examples
    val: Examples | None
    sampler: Sampler
    rows: int
    accum: int
    seq: int
    pad: int  # the id padding is filled with (it never counts)
    eval_batches: int = DataSettings.eval_batches

    @property
    def tokens_per_step(self) -> int:
        """Tokens of an average step (padding aside)."""
        return int(self.rows * self.accum * len(self.train.ids) / max(len(self.train), 1))

    def batch(self, step: int):
        per_step = self.rows * self.accum
        idx = self.sampler.indices(step * per_step, per_step).reshape(self.accum, self.rows)
        return self._gather(idx, TrainData._part())

    def _gather(self, idx: np.ndarray, part, examples: Examples | None = None):
        examples = examples or self.train
        length = bucket(int(examples.lengths(idx).max()) - 1, self.seq)
        mine = rows_of(idx, part)
        tokens, weights = gather(examples, mine.reshape(-1), length, self.pad)
        return tokens.reshape(*mine.shape, -1), weights.reshape(*mine.shape, -1)

    def validation(self) -> list:
        if self.val is None:
            return []
        n = max(1, min(len(self.val) // self.rows, self.eval_batches))
        order = np.resize(np.arange(len(self.val)), n * self.rows)  # repeated when too few
        return [
            self._gather(rows[None], TrainData._part(), self.val)
            for rows in order.reshape(n, self.rows)
        ]

    def describe(self) -> str:
        cut = f" ({self.train.cut} cut to {self.seq + 1} tokens)" if self.train.cut else ""
        return f"{len(self.train)} train examples{cut}"


# ---- the loop ----------------------------------------------------------------------------


class Prefetcher:
    """Makes the batches of steps first..last-1 on a background thread, `depth` ahead.

    So the host's slicing and copying of step n+1's batch overlaps the device's step n.
    """

    def __init__(self, make: Callable[[int], Any], first: int, last: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(make, first, last), daemon=True)
        self._thread.start()

    def _fill(self, make, first, last) -> None:
        for step in range(first, last):
            try:
                item = (step, make(step), None)
            except Exception as error:  # raised again in the loop's thread, by get()
                item = (step, None, error)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None or self._closed.is_set():
                return

    def get(self, step: int) -> Any:
        made, batch, error = self._queue.get()
        if error is not None:
            raise error
        assert made == step, f"prefetched step {made}, wanted {step}"
        return batch

    def close(self) -> None:
        self._closed.set()
        self._thread.join()


class Diverged(UserError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"the loss became NaN or infinite at step {step}")


class Hooks(Protocol):
    def on_log(self, record: dict) -> None: ...
    def on_save(self, state: TrainState, step: int) -> None: ...

    # More fields for step `step`'s record (a task's accuracy, a sample), from the params alone;
    # `evaluating`: the validation loss is measured at this step.
    def measure(self, params: Any, step: int, evaluating: bool) -> dict: ...

    # Around the first training step and the first evaluation: XLA compiles them then.
    def compiling(self, what: str) -> AbstractContextManager[None]: ...


def train_loop(
    trainer: Trainer,
    state: TrainState,
    data: TrainData,
    settings: LoopSettings,
    hooks: Hooks,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[TrainState, int]:
    """Run steps until settings.steps or a stop request; returns the state and its step.

    Losses stay on the device between log points; they are read (and checked for NaN) at
    each log, evaluation and save.
    """
    step = int(jax.device_get(state.step))
    batches = Prefetcher(lambda s: trainer.place(data.batch(s)), step, settings.steps)
    try:
        return _steps(trainer, state, step, batches, data, settings, hooks, should_stop)
    finally:
        batches.close()


def _steps(trainer, state, step, batches, data, settings, hooks, should_stop):
    pending: list[tuple[int, jax.Array]] = []
    since, tokens_since = time.perf_counter(), 0
    validation = data.validation()
    compiled: set[str] = set()

    def first_compiles(what: str, call: Callable, *args: Any) -> Any:
        if what in compiled:
            return call(*args)
        with hooks.compiling(what):
            result = call(*args)
        compiled.add(what)
        return result

    def flush(val_loss: float | None = None, extra: dict | None = None) -> None:
        nonlocal since, tokens_since
        losses = [float(x) for x in jax.device_get([loss for _, loss in pending])]
        for (s, _), loss in zip(pending, losses, strict=True):
            if not math.isfinite(loss):
                raise Diverged(s)
        now = time.perf_counter()
        record = {"step": step}
        if losses:
            record["loss"] = float(np.mean(losses))
            record["lr"] = trainer.lr_at(step - 1)
            record["tokens_per_s"] = tokens_since / max(now - since, 1e-9)
        if val_loss is not None:
            record["val_loss"] = val_loss
        hooks.on_log({**record, **(extra or {})})
        pending.clear()
        since, tokens_since = now, 0

    while step < settings.steps:
        state, metrics = first_compiles("training step", trainer.step, state, batches.get(step))
        pending.append((step + 1, metrics["loss"]))
        step += 1
        tokens_since += data.tokens_per_step
        last = step == settings.steps
        stopping = should_stop()
        evaluating = last or bool(settings.eval_every and step % settings.eval_every == 0)
        extra = hooks.measure(state.params, step, evaluating)
        if evaluating and validation:
            val_loss = first_compiles("evaluation", trainer.eval_loss, state.params, validation)
            flush(val_loss, extra)
        elif extra or (pending and (step % settings.log_every == 0 or last or stopping)):
            flush(extra=extra)
        if stopping:
            break
        if settings.save_every and step % settings.save_every == 0 and not last:
            if pending:
                flush()
            hooks.on_save(state, step)
    if pending:
        flush()
    return state, step
