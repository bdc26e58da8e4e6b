"""The engine thread: continuous batching of requests over a block of slots.

One thread owns the device. Requests (one `Job` per choice) wait in a bounded queue; between
decode chunks the thread admits waiting jobs (at most `max_batch` admitted at once), reads one
chunk of the oldest admitted prompt into a one-row stage, then runs one decode chunk of every
decoding row. A prompt read whole gets a row of the block; a row is freed as soon as its job
finishes, hits a stop, or is cancelled. Busy rows are kept first, and the block is the
smallest size in `row_buckets` that holds them with the shortest cache length that holds
their tokens (resized only when a job starts or ends, or a row outgrows the length), so one
short request alone pays for one short row, not for `max_batch` rows of the whole context.

The programs a first request needs are compiled before `ready`, the others in the background
or when first needed (`warmup.py`).

Text is made here too (`generate.RowText`: UTF-8-safe detokenizing, stop strings held back),
so a stop frees its row at once; each job gets its output through `sink`, a thread-safe
callback, one `Delta` per chunk and a last `Finish` or `Failed`.

When a job ends, its row's tokens and their keys and values are kept in a `PrefixCache`
(`prefix_cache_bytes`; 0 keeps nothing); a prompt starting with kept tokens has its stage
seeded from them and reads only the rest.

A job that echoes its prompt with logprobs first gets a `Prompt`: the jobs admitted together
have their prompts scored in one batched teacher-forced pass (`scoring.Scorer`) before any of
them is read into a row; a job of `max_tokens` 0 ends there.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gpt2cli.generate import RowText
from gpt2cli.scoring import TOP_LOGPROBS, Scored
from gpt2cli.serve.prefix_cache import PrefixCache
from gpt2cli.serve.protocol import Settings

QUEUE_FULL = "the server is busy: the request queue is full, retry shortly"


class QueueFull(Exception):
    """No room in the queue for this request."""


@dataclass(frozen=True)
class TokenInfo:
    """A generated token and, when asked, its logprob and the most likely alternatives."""

    token: int
    logprob: float | None  # None: a prompt's first token, which nothing predicts
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    text: str
    tokens: tuple[TokenInfo, ...]


@dataclass(frozen=True)
class Prompt:
    tokens: tuple[TokenInfo, ...]  # every prompt token, scored given the ones before it


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" (a stop string or <|endoftext|>) or "length"
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


@dataclass(eq=False, kw_only=True)
class Job:
    """One choice of one request: what to generate, and where its output goes."""

    prompt: list[int]
    max_tokens: int
    settings: Settings  # the request's: how to pick each token, which logprobs to report
    sample: int  # which random stream of the seed (the choice's index, as --num-samples)
    stop: tuple[str, ...]
    sink: Callable[[Prompt | Delta | Finish | Failed], None]
    score_prompt: bool = False  # send the prompt's logprobs (echo) before generating
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)
    # the engine thread's bookkeeping
    row: int | None = None  # its row in the block, once its prompt is read
    prefilled: int = 0  # prompt tokens in its stage (read, or taken from the prefix cache)
    reused: int = 0  # of those, taken from the prefix cache
    cached: int = 0  # tokens in its row's cache once every dispatched chunk has run
    generated: int = 0
    made: list[int] = field(default_factory=list)  # the tokens delivered
    text: RowText | None = None
    first_token_at: float | None = None


def row_buckets(max_batch: int) -> list[int]:
    """Block sizes: powers of two below max_batch, then max_batch."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_batch})


def toward(sizes: list[int], now: int, want: int) -> int:
    """The neighbour of `now` in the sorted `sizes`, on the side of `want`."""
    i = sizes.index(now)
    return sizes[i + 1] if want > now else sizes[i - 1]


class Scheduler:
    """Owns the engine thread. `submit` and `cancel` may be called from any thread."""

    def __init__(
        self,
        load: Callable[[], tuple],
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        queue_timeout: float = 60.0,
        prefix_cache_bytes: int = 0,
        metrics=None,
        warm_up: str = "background",
        on_ready: Callable[[], None] | None = None,  # also told a failed load
    ):
        self._load = load  # () -> (SlotPrograms, tokenizer), run on the engine thread
        self.warm_up = warm_up  # "background", "first" or "all": see warmup.py
        self._on_ready = on_ready  # called once ready, never after `begin_shutdown`
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.metrics = metrics
        self.prefix = PrefixCache(prefix_cache_bytes, release=_delete)
        self.buckets = row_buckets(max_batch)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.programs = None
        self.tokenizer = None
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._reading: deque[Job] = deque()  # admitted, prompt being read (the first one only)
        self._stage = None  # the one-row stage the first reading job's prompt is read into
        self._jobs: list[Job] = []  # job i decodes in row i
        self._slots_rows = 0  # rows in the block (0 until the model is loaded)
        self._slots_length = 0  # cache slots per row in the block
        self._inflight = None  # (jobs and their rows, tokens) of the decode chunk still running
        self._stopping = False
        self._closing = False  # shutting down: compile nothing more in the background
        self.warmer = None  # the background compiles (warmup.Warmer), once ready
        self._thread = threading.Thread(target=self._run, name="gpt2-engine", daemon=True)

    # ---- any thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs together, or raise QueueFull (nothing queued)."""
        with self._cond:
            if self._stopping or len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(QUEUE_FULL)
            self._waiting.extend(jobs)
            self._cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """Stop these jobs: the engine frees their rows before its next chunk."""
        with self._cond:
            for job in jobs:
                job.cancelled = True
            self._cond.notify()

    def begin_shutdown(self) -> None:
        """The server is shutting down: compile nothing more in the background and never
        announce `ready`; the jobs in flight go on until `stop`."""
        with self._cond:
            self._closing = True
            if self.warmer:
                self.warmer.stop()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything and end the engine thread, waiting up to `timeout` for it and the
        background compiles (a compile cannot be interrupted: see `running`)."""
        self.begin_shutdown()
        with self._cond:
            self._stopping = True
            for job in [*self._waiting, *self._reading, *self._jobs]:
                job.cancelled = True
            self._cond.notify()
        end = time.monotonic() + timeout
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.warmer:
            self.warmer.join(max(end - time.monotonic(), 0))

    @property
    def running(self) -> bool:
        """The engine thread or the background compiles have not ended."""
        return self._thread.is_alive() or bool(self.warmer and self.warmer.running)

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def busy_rows(self) -> int:
        return len(self._jobs) + len(self._reading)

    @property
    def block_rows(self) -> int:
        return self._slots_rows

    @property
    def block_length(self) -> int:
        return self._slots_length

    @property
    def programs_compiled(self) -> int:
        return self.programs.compiled_count if self.programs else 0

    @property
    def programs_waiting(self) -> int:
        return self.warmer.waiting if self.warmer else 0

    # ---- the engine thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            self.programs, self.tokenizer = self._load()
            started = self._warm_up()
        except Exception as exc:  # noqa: BLE001 - reported by /health and the CLI
            with self._cond:
                self.load_error = f"{type(exc).__name__}: {exc}"
                self.ready.set()
                if self._on_ready and not self._closing:
                    self._on_ready()
            return
        if not started:
            return
        while self._next_round():
            self._read_prompts()
            self._decode_chunk()

    def _warm_up(self) -> bool:
        """Compile what `warm_up` says comes before `ready` (warmup.py), then set `ready` and
        start compiling the rest in the background. -> False: shut down before it was ready."""
        from gpt2cli.serve.warmup import Warmer, every_program, first_programs

        p = self.programs
        plan = every_program(p, self.buckets)
        for program in plan if self.warm_up == "all" else first_programs(p):
            if self._closing:
                return False
            p.compiled(program)
        self._slots_rows, self._slots_length = self.buckets[0], p.lengths[0]
        self._slots = p.empty(self._slots_rows, self._slots_length)
        self._settings = None  # device copy of the rows' settings, rebuilt when rows change
        with self._cond:
            if self._closing:
                return False
            if self.warm_up == "background":
                self.warmer = Warmer(p, plan)
                self.warmer.start()
            self.ready.set()
            if self._on_ready:
                self._on_ready()
        return True

    def _next_round(self) -> bool:
        """Wait for work; admit what fits; drop what was cancelled. False: stop the thread."""
        with self._cond:
            while not (
                self._stopping or self._waiting or self._reading or self._jobs or self._inflight
            ):
                self._cond.wait()
            if self._stopping:
                for job in [*self._waiting, *self._reading, *self._jobs]:
                    job.sink(Failed(503, "the server is shutting down"))
                self._waiting.clear()
                self._reading.clear()
                self._jobs.clear()
                return False
            now = time.monotonic()
            admitted = []
            kept = deque()
            for job in self._waiting:
                if job.cancelled:
                    continue
                if self.busy_rows + len(admitted) < self.max_batch:
                    admitted.append(job)
                elif now - job.queued_at > self.queue_timeout:
                    job.sink(Failed(503, QUEUE_FULL))
                else:
                    kept.append(job)
            self._waiting = kept
            finished = [job for job in self._jobs if job.cancelled]
            partial = None  # a prompt cancelled while being read, and its stage
            if self._reading and self._reading[0].cancelled:
                partial, self._stage = (self._reading[0], self._stage), None
            self._reading = deque(job for job in self._reading if not job.cancelled)
        for job in finished:
            self._free(job)
        if partial and partial[1] is not None:  # the chunks read so far are kept
            job, stage = partial
            self._keep(job.prompt[: job.prefilled], stage.cache, 0)
        if admitted:
            self._admit(admitted)
        return True

    def _admit(self, jobs: list[Job]) -> None:
        eos = self.programs.config.eos_token_id
        self._score_prompts([job for job in jobs if job.score_prompt])
        for job in jobs:
            if self.metrics:
                self.metrics.queue_wait.observe(time.monotonic() - job.queued_at)
            if job.max_tokens == 0:  # an echoed prompt alone: nothing to generate
                job.sink(Finish("length", 0))
                continue
            job.text = RowText(self.tokenizer, job.stop, job.max_tokens, eos)
            self._reading.append(job)

    def _score_prompts(self, jobs: list[Job]) -> None:
        """Send each job its prompt's logprobs, every distinct prompt scored once, together."""
        prompts = list({tuple(job.prompt): None for job in jobs if len(job.prompt) > 1})
        if not prompts:
            return
        top = TOP_LOGPROBS if any(job.settings.logprobs for job in jobs) else 0
        scored = dict(zip(prompts, self.programs.scorer(prompts, top=top), strict=True))
        for job in jobs:
            scores = scored.get(tuple(job.prompt))
            job.sink(Prompt(prompt_infos(job.prompt, scores, job.settings.logprobs or 0)))

    def _free(self, job: Job) -> None:
        """Keep the row's tokens in the prefix cache and give the row back; the last busy row
        moves into it so busy rows stay first."""
        # every delivered token but the last was fed back, so the row holds its keys and values
        self._keep(job.prompt + job.made[:-1], self._slots.cache, job.row)
        last = len(self._jobs) - 1
        if job.row != last:
            moved = self._jobs[last]
            self._slots = self.programs.move(self._slots, last, job.row)
            self._jobs[job.row] = moved
            moved.row = job.row
        self._jobs.pop()
        job.row = None
        self._settings = None

    def _fit_block(self) -> None:
        """Resize the block to the fewest rows holding every decoding row and the shortest
        length holding their next chunk, one bucket at a time (the resizes between neighbours
        are the ones compiled)."""
        p = self.programs
        rows = next(b for b in self.buckets if b >= max(len(self._jobs), 1))
        length = p.fitting(max((job.cached + p.chunk for job in self._jobs), default=0))
        while rows != self._slots_rows:
            self._slots_rows = toward(self.buckets, self._slots_rows, rows)
            self._slots = p.resize(self._slots, rows=self._slots_rows, length=self._slots_length)
            self._settings = None
        while length != self._slots_length:
            self._slots_length = toward(p.lengths, self._slots_length, length)
            self._slots = p.resize(self._slots, rows=rows, length=self._slots_length)

    def _settings_now(self):
        if self._settings is None:
            from gpt2cli.serve.programs import settings_arrays

            rows: list[Settings | None] = [None] * self._slots_rows
            for job in self._jobs:
                rows[job.row] = job.settings
            self._settings = settings_arrays(rows, self.programs.config.vocab_size)
        return self._settings

    def _read_prompts(self) -> None:
        """Read prompt chunks, oldest prompt first, until a prefill chunk's width of tokens was
        computed (several short prompts, or one chunk of a long one): the decoding rows wait for
        no more than that between two decode chunks."""
        spent = 0
        while self._reading and spent < self.programs.prefill_chunk:
            spent += self._prefill_one()

    def _prefill_one(self) -> int:
        """One chunk of the oldest prompt still being read (admitted first, read first); a
        prompt read whole takes a row of the block. -> the width computed."""
        from gpt2cli.serve.programs import settings_arrays

        job, p = self._reading[0], self.programs
        if self._stage is None:
            self._stage = self._open_stage(job)
        part = job.prompt[job.prefilled : job.prefilled + p.prefill_chunk]
        self._stage, picked = p.prefill_stage(
            self._stage,
            settings_arrays([job.settings], p.config.vocab_size),
            part,
            job.prefilled,
            job.prompt,
            job.settings.sampling.seed,
            job.sample,
        )
        job.prefilled += len(part)
        if job.prefilled == len(job.prompt):
            self._reading.popleft()
            stage, self._stage = self._stage, None
            self._deliver(job, {k: np.asarray(v)[None] for k, v in vars(picked).items()})
            if job.text.finish_reason:  # done at its first token: the prompt is kept
                self._keep(job.prompt, stage.cache, 0)
            else:
                job.row, job.cached = len(self._jobs), len(job.prompt)
                self._jobs.append(job)
                self._fit_block()
                if stage.cache.length != self._slots_length:
                    stage = p.resize(stage, rows=1, length=self._slots_length)
                self._slots = p.insert(self._slots, stage, np.int32(job.row))
                self._settings = None  # the row turns active
        return p.width(len(part))

    def _open_stage(self, job: Job):
        """A stage for the job's prompt, holding the longest prefix of it that the prefix cache
        has (never all of it: the last token is read to pick the first new one)."""
        from gpt2cli.serve.programs import copy_row

        p = self.programs
        stage = p.empty(1, p.stage_length(len(job.prompt)))
        entry, shared = self.prefix.lookup(job.prompt)
        reuse = min(shared, len(job.prompt) - 1)
        if reuse > 0:
            stage = stage.replace(cache=copy_row(stage.cache, entry.value, np.int32(0)))
            job.prefilled = job.reused = reuse
            if self.metrics:
                self.metrics.prefix_hits.inc()
                self.metrics.prefix_tokens.inc(reuse)
        return stage

    def _keep(self, tokens: list[int], cache, row: int) -> None:
        """Keep a copy of row `row` of `cache`, which holds `tokens`, in the prefix cache (unless
        it is over the budget or a kept entry already starts with these tokens)."""
        from gpt2cli.serve.programs import copy_row

        if not tokens or not self.prefix.budget:
            return
        length = self.programs.fitting(len(tokens))
        nbytes = self._entry_bytes(length)
        if not self.prefix.fits(nbytes) or self.prefix.covered(tokens):
            return
        entry = copy_row(self.programs.one.new_cache(1, length), cache, np.int32(row))
        self.prefix.add(tokens, entry, nbytes)

    @functools.cache  # noqa: B019 - one scheduler per server, a few lengths
    def _entry_bytes(self, length: int) -> int:
        """The bytes of a one-row cache of `length` slots."""
        import jax

        shapes = jax.eval_shape(lambda: self.programs.one.new_cache(1, length))
        return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(shapes))

    def _decode_chunk(self) -> None:
        """Dispatch the next chunk, then read the one before it while the device runs this one
        (JAX dispatches asynchronously): the device never waits for the host's text work."""
        self._fit_block()
        decoding = [(job, job.row) for job in self._jobs]
        ahead = None
        if decoding:
            p = self.programs
            self._slots, picked = p.decode(self._slots, self._settings_now())
            for job in self._jobs:
                job.cached += p.chunk
            ahead = (decoding, picked)
        previous, self._inflight = self._inflight, ahead
        if previous is not None:
            self._collect(*previous)

    def _collect(self, decoding: list, picked) -> None:
        """Deliver a decoded chunk to the jobs that were in its rows when it was dispatched
        (the rows may have moved since); free the jobs it finished."""
        picked = {k: np.asarray(v) for k, v in vars(picked).items()}
        live = [(job, row) for job, row in decoding if job.row is not None and not job.cancelled]
        for job, row in live:
            self._deliver(job, {k: v[row] for k, v in picked.items()})
        for job, _ in live:
            if job.text.finish_reason:
                self._free(job)

    def _deliver(self, job: Job, picked: dict) -> None:
        """Feed a row's new tokens ([k] arrays) to its text; send what it shows."""
        if job.cancelled or job.text.finish_reason:
            return
        want_top = job.settings.logprobs or 0
        text, infos = [], []
        for i, token in enumerate(picked["token"].tolist()):
            job.generated += 1
            job.made.append(token)
            text.append(job.text.feed(token))
            top = ()
            if want_top:
                ids = picked["top_ids"][i][:want_top].tolist()
                top = tuple(zip(ids, picked["top_logprobs"][i][:want_top].tolist(), strict=True))
            # an <|endoftext|> keeps its entry: a client slicing the lists counts on it
            infos.append(TokenInfo(token, float(picked["logprob"][i]), top))
            if job.text.finish_reason:
                break
        now = time.monotonic()
        if job.first_token_at is None:
            job.first_token_at = now
            if self.metrics:
                self.metrics.first_token.observe(now - job.queued_at)
        if self.metrics:
            self.metrics.generated_tokens.inc(len(text))
        job.sink(Delta("".join(text), tuple(infos)))
        if job.text.finish_reason:
            reason = "length" if job.text.finish_reason == "length" else "stop"
            job.sink(Finish(reason, job.generated, job.reused))


def _delete(cache) -> None:
    """Free a kept cache's device buffers now (nothing else holds them: see `copy_row`)."""
    import jax

    for a in jax.tree_util.tree_leaves(cache):
        a.delete()


def prompt_infos(prompt: list[int], scored: Scored | None, want: int) -> tuple[TokenInfo, ...]:
    """A prompt's tokens with their scores (`scored` is None for a one-token prompt) and their
    `want` top logprobs."""
    first = TokenInfo(prompt[0], None)
    if scored is None:
        return (first,)
    rest = zip(prompt[1:], scored.logprobs, scored.top_ids, scored.top_logprobs, strict=True)
    infos = [first]
    for token, lp, ids, lps in rest:
        top = zip(ids[:want].tolist(), lps[:want].tolist(), strict=True)
        infos.append(TokenInfo(token, float(lp), tuple(top)))
    return tuple(infos)
