"""The server's compiled programs over a block of slots: one row of KV cache per request.

Unlike `engine.py`, where every row of a batch starts together and shares one write index,
a slot here is taken and freed at any time: each row keeps its own length (`cache.index` is
[B]), writes its keys at its own position, and carries its own sampling settings as arrays
(`RowSettings`: a `sampling.Rule` of one value per row), so a new mix of requests never
recompiles. The model is the same `GPT2`: the decode step runs it on one row under `jax.vmap`,
which turns the shared write into a per-row scatter, and the matrix products still read each
weight once for all rows.

A prompt is read into a one-row *stage* (prefill), then copied into a free row of the block
(insert), so the prefill programs do not depend on the block's shape. The block has R rows and
the shortest of a few cache lengths that holds every row (`lengths`): a row attends over the
slots of its block only, so a short conversation does not pay for the whole context window.
A server that steers (`gpt2 serve --steer`) steers every row alike: the engines' `Steering`,
passed to each program as an argument.

Each program is compiled ahead of time for one shape (`Program`: its kind and block shape), once,
on first use or by `gpt2 serve`'s warm-up (`serve/warmup.py`), from any thread: a second thread
asking for a program being compiled waits for that one program. A program is never traced again.

Shapes: B rows, S cache slots per row (the block's length; at most the context window plus one
prefill chunk), C prefill chunk, V vocabulary, L logprobs kept per token (TOP_LOGPROBS).
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gpt2cli import kernels, sampling
from gpt2cli.engine import Engine, steered
from gpt2cli.model import KVCache
from gpt2cli.scoring import Scorer
from gpt2cli.serve.protocol import Settings

TOP_LOGPROBS = 20  # the most `top_logprobs` a request may ask for (OpenAI's limit)
SHORT_PREFILL = 32  # the narrower prefill block, for short prompts and prompts' last chunks
# the fields of a row's rule that its `SamplingParams.rule` gives (the server adds the others)
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "log_min_p", "repetition_penalty")


@dataclass(frozen=True, order=True)
class Program:
    """One compiled program: its kind and the block shape it runs on."""

    kind: str  # "prefill", "decode", "insert", "move" or "resize"
    rows: int
    length: int  # cache slots per row (prefill: the stage's)
    width: int = 0  # prefill: prompt tokens per call
    to_rows: int = 0  # resize: the shape it makes
    to_length: int = 0


@struct.dataclass
class Slots:
    """The device-side state of every row, kept between calls (donated to each program)."""

    cache: KVCache  # keys, values [B, H, S, K]; mask [B, S]; index [B]: tokens in the row
    token: jax.Array  # [B] int32: the last sampled token, the next input
    seen: jax.Array  # [B, V] bool: prompt and generated tokens (repetition penalty)
    counts: jax.Array  # [B, V] int32: generated tokens (presence and frequency penalties)
    keys: jax.Array  # [B] PRNG keys: fold_in(key(seed), sample index)
    step: jax.Array  # [B] int32: tokens sampled so far (folded into the key)


@struct.dataclass
class RowSettings:
    """What a step reads about each row, as arrays; the host builds them (`settings_arrays`)."""

    rule: sampling.Rule  # each field [B] (logit_bias [B, V]): how the row picks its token
    logprobs: jax.Array  # [B] int32: -1 none; 0 the token's own; n > 0 and the top L too
    active: jax.Array  # [B] bool: the row decodes (false: a free row)


@struct.dataclass
class Picked:
    """What a step returns per row: the token, its logprob and the most likely alternatives."""

    token: jax.Array  # [...] int32
    logprob: jax.Array  # [...] float32, under the model's own distribution
    top_ids: jax.Array  # [..., L] int32
    top_logprobs: jax.Array  # [..., L] float32


def settings_arrays(rows: list[Settings | None], vocab: int) -> RowSettings:
    """Host arrays for B rows: each row's request settings, or None for a free row."""
    b = len(rows)
    rule = {
        "temperature": np.zeros(b, np.float32),
        "top_k": np.zeros(b, np.int32),
        "top_p": np.ones(b, np.float32),
        "log_min_p": np.full(b, -np.inf, np.float32),
        "repetition_penalty": np.ones(b, np.float32),
        "presence_penalty": np.zeros(b, np.float32),
        "frequency_penalty": np.zeros(b, np.float32),
        "logit_bias": np.zeros((b, vocab), np.float32),
    }
    logprobs = np.full(b, -1, np.int32)
    active = np.zeros(b, np.bool_)
    for i, row in enumerate(rows):
        if row is None:
            continue
        active[i] = True
        for name in SAMPLING_FIELDS:  # as the engine's static rule has them
            rule[name][i] = getattr(row.sampling.rule, name)
        rule["presence_penalty"][i] = row.presence_penalty
        rule["frequency_penalty"][i] = row.frequency_penalty
        for token, bias in row.logit_bias:
            rule["logit_bias"][i, token] = bias
        logprobs[i] = -1 if row.logprobs is None else row.logprobs
    return RowSettings(rule=sampling.Rule(**rule), logprobs=logprobs, active=active)


def choose(logits, seen, counts, s: RowSettings, keys, step) -> Picked:
    """Each row's token, picked under its own rule by `sampling.pick` (as `gpt2 generate` picks,
    so a row gives that command's tokens for the same settings and seed), and the logprobs the
    row asks for.

    Work no row asks for is skipped by `lax.cond`s whose results are small: each pass over
    [B, V] costs, and so does a [B, V] result of a `cond` (XLA:CPU copies it).
    """
    rows = logits.shape[0]
    token = sampling.pick(logits, s.rule, keys, step, seen=seen, counts=counts)

    def scores():
        logprobs = jax.nn.log_softmax(logits, axis=-1)  # the model's, before any rule
        top_lp, top_ids = jax.lax.cond(
            jnp.any(s.logprobs > 0),
            lambda: tuple(jax.lax.top_k(logprobs, TOP_LOGPROBS)),
            lambda: _no_top(rows),
        )
        return logprobs[jnp.arange(rows), token], top_ids.astype(jnp.int32), top_lp

    def no_scores():
        top_lp, top_ids = _no_top(rows)
        return jnp.zeros(rows, jnp.float32), top_ids, top_lp

    logprob, top_ids, top_lp = jax.lax.cond(jnp.any(s.logprobs >= 0), scores, no_scores)
    return Picked(token, logprob, top_ids, top_lp)


def _no_top(rows: int) -> tuple[jax.Array, jax.Array]:
    """(logprobs, ids) [rows, L] of no top tokens."""
    return jnp.zeros((rows, TOP_LOGPROBS), jnp.float32), jnp.zeros((rows, TOP_LOGPROBS), jnp.int32)


def _record(slots: Slots, token, active) -> Slots:
    """Count a sampled token in the row's history (free rows are left alone)."""
    rows = jnp.arange(token.shape[0])
    return slots.replace(
        token=jnp.where(active, token, slots.token),
        seen=slots.seen.at[rows, token].set(slots.seen[rows, token] | active),
        counts=slots.counts.at[rows, token].add(active.astype(jnp.int32)),
        step=slots.step + active,
    )


def length_buckets(most: int) -> list[int]:
    """Cache lengths of a block: 64 to 256 slots by 64 (where most rows are, and a step's reads
    of the cache weigh most against the weights'), then doubling up to half of `most`, then
    `most` (GPT-2: 64, 128, 192, 256, 512, 1152)."""
    sizes = [n for n in range(64, 257, 64) if n < most]
    while sizes and sizes[-1] * 2 <= most // 2:
        sizes.append(sizes[-1] * 2)
    return [*sizes, most]


class SlotPrograms:
    """The jitted programs over `Slots`: prefill a stage row, insert it into a block, decode
    every row of a block, move rows; and a `Scorer` of echoed prompts, on `many`'s weights.

    The kernels (kernels.py) may differ by the rows computed together (on a CPU, float32
    weights stored (out, in) for one row), so a block of one row uses `one`, larger blocks
    `many`: each engine's params and kernels. Both engines steer alike (`one.steering`).
    """

    def __init__(self, one: Engine, many: Engine, chunk: int, prefill_chunk: int):
        self.one, self.many = one, many
        self.config = one.config
        self.chunk = chunk
        self.prefill_chunk = prefill_chunk
        self.lengths = length_buckets(self.config.n_positions + max(chunk, prefill_chunk))
        self.models = {True: one.programs.model, False: many.programs.model}
        self.kernels = {True: one.kernels, False: many.kernels}
        self.steering = one.steering
        self._jits = {
            "prefill": jax.jit(self._prefill, donate_argnames="stage"),
            "decode": jax.jit(self._decode, static_argnames="single", donate_argnames="slots"),
            "insert": jax.jit(_insert, donate_argnames="slots"),
            "move": jax.jit(_move, donate_argnames="slots"),
            "resize": jax.jit(_resize, static_argnames=("rows", "length")),
        }
        self.scorer = Scorer(self.config, many.params, many.dtype, out_in=many.kernels.out_in)
        self._compiled: dict[Program, object] = {}
        self._compiling: set[Program] = set()
        self._lock = threading.Condition()
        self.compiles: Counter[Program] = Counter()  # each program's compiles: 1 each, ever
        self.traces = 0  # model programs traced (prefill and decode)

    @property
    def compiled_count(self) -> int:
        return len(self._compiled)

    def is_compiled(self, program: Program) -> bool:
        return program in self._compiled

    def compiled(self, program: Program):
        """The compiled `program`: compiled now in this thread, or waited for while another
        thread compiles it."""
        with self._lock:
            while program in self._compiling:
                self._lock.wait()
            if program in self._compiled:
                return self._compiled[program]
            self._compiling.add(program)
        done = None
        try:
            done = self._lower(program).compile()
        finally:
            with self._lock:
                self._compiling.discard(program)
                if done is not None:
                    self._compiled[program] = done
                    self.compiles[program] += 1
                self._lock.notify_all()
        return done

    def _lower(self, program: Program):
        """Trace and lower `program` on abstract arguments of its shape."""
        rows, length, vocab = program.rows, program.length, self.config.vocab_size
        jitted = self._jits[program.kind]
        slots = self._abstract_slots(rows, length)
        i32 = np.int32(0)
        if program.kind == "prefill":
            settings = settings_arrays([Settings()], vocab)
            ids, seen = np.zeros(program.width, np.int32), np.zeros(vocab, np.bool_)
            return jitted.lower(
                self.one.params, slots, settings, ids, i32, i32, seen, np.uint32(0), i32,
                self.steering,
            )  # fmt: skip
        if program.kind == "decode":
            settings = settings_arrays([None] * rows, vocab)
            return jitted.lower(self.params(rows), slots, settings, self.steering, single=rows == 1)
        if program.kind == "insert":
            return jitted.lower(slots, self._abstract_slots(1, length), i32)
        if program.kind == "move":
            return jitted.lower(slots, i32, i32)
        return jitted.lower(slots, rows=program.to_rows, length=program.to_length)

    def _abstract_slots(self, rows: int, length: int) -> Slots:
        return jax.eval_shape(functools.partial(self.empty, rows, length))

    def fitting(self, needed: int) -> int:
        """The shortest cache length with `needed` slots (the longest if none has)."""
        return next((n for n in self.lengths if n >= needed), self.lengths[-1])

    def stage_length(self, prompt_tokens: int) -> int:
        """A stage holds the prompt and the widest block of its last chunk."""
        return self.fitting(prompt_tokens + self.prefill_chunk)

    @property
    def widths(self) -> list[int]:
        """Prefill block widths: a short prompt need not pay for a whole chunk."""
        return sorted({min(SHORT_PREFILL, self.prefill_chunk), self.prefill_chunk})

    def width(self, tokens: int) -> int:
        """The narrowest prefill block that holds `tokens`."""
        return next(w for w in self.widths if w >= tokens)

    def prefill_stage(self, stage, settings, part, start, prompt, seed, sample):
        """Host side of `prefill`: arrays of fixed dtypes (a Python int where an int32 was
        traced would compile again), the narrowest width that holds `part`."""
        ids = np.zeros(self.width(len(part)), np.int32)
        ids[: len(part)] = part
        seen = np.zeros(self.config.vocab_size, np.bool_)
        seen[prompt] = True
        program = Program("prefill", 1, stage.cache.length, width=len(ids))
        return self.compiled(program)(
            self.one.params,
            stage,
            settings,
            ids,
            np.int32(start),
            np.int32(len(part)),
            seen,
            np.uint32(seed),
            np.int32(sample),
            self.steering,
        )

    def params(self, rows: int):
        return (self.one if rows == 1 else self.many).params

    def decode(self, slots: Slots, settings: RowSettings):
        """`chunk` tokens for every active row of the block -> (slots, Picked [B, chunk])."""
        rows = slots.token.shape[0]
        program = self.compiled(Program("decode", rows, slots.cache.length))
        return program(self.params(rows), slots, settings, self.steering)

    def insert(self, slots: Slots, stage: Slots, row: int) -> Slots:
        program = self.compiled(Program("insert", slots.token.shape[0], slots.cache.length))
        return program(slots, stage, np.int32(row))

    def move(self, slots: Slots, src: int, dst: int) -> Slots:
        program = self.compiled(Program("move", slots.token.shape[0], slots.cache.length))
        return program(slots, np.int32(src), np.int32(dst))

    def resize(self, slots: Slots, rows: int, length: int) -> Slots:
        """The block with `rows` rows (the first ones, or more free rows) of `length` slots."""
        now = Program(
            "resize", slots.token.shape[0], slots.cache.length, to_rows=rows, to_length=length
        )
        return self.compiled(now)(slots)

    def empty(self, rows: int, length: int) -> Slots:
        cfg = self.config
        cache = self.one.new_cache(rows, length)
        return Slots(
            cache=cache.replace(index=jnp.zeros((rows,), jnp.int32)),
            token=jnp.zeros((rows,), jnp.int32),
            seen=jnp.zeros((rows, cfg.vocab_size), jnp.bool_),
            counts=jnp.zeros((rows, cfg.vocab_size), jnp.int32),
            keys=jax.vmap(jax.random.key)(jnp.zeros((rows,), jnp.uint32)),
            step=jnp.zeros((rows,), jnp.int32),
        )

    def _prefill(self, params, stage, settings, ids, start, n, seen, seed, sample, steering):
        """Run tokens ids[:n] (of [C]) into the one-row stage from slot `start`; sample the next
        token with the row's `settings` (a one-row RowSettings)."""
        with self._lock:
            self.traces += 1
        top = self.config.n_positions - 1
        width = ids.shape[0]
        positions = jnp.minimum(start + jnp.arange(width), top)[None]  # [1, C]
        mask = (jnp.arange(width) < n)[None]  # [1, C]
        with kernels.use(self.one.kernels), steered(steering):
            logits, cache = self.one.programs.model.apply(
                {"params": params},
                ids[None],
                positions,
                mask,
                cache=stage.cache.replace(index=start),
                logits_at=(n - 1)[None],
            )  # [1, 1, V]
        key = jax.random.fold_in(jax.random.key(seed), sample)
        counts = jnp.zeros((1, seen.shape[0]), jnp.int32)
        picked = choose(
            logits[:, 0], seen[None], counts, settings, key[None], jnp.zeros(1, jnp.int32)
        )
        token = picked.token[0]
        stage = Slots(
            cache=cache.replace(index=(start + n)[None]),
            token=picked.token,
            seen=seen.at[token].set(True)[None],
            counts=counts.at[0, token].set(1),
            keys=key[None],
            step=jnp.ones(1, jnp.int32),
        )
        return stage, jax.tree_util.tree_map(lambda a: a[0], picked)

    def _decode(self, params, slots, settings, steering, *, single):
        """`chunk` tokens for every active row -> (slots, Picked with [B, chunk] leaves)."""
        with self._lock:
            self.traces += 1
        model, chosen = self.models[single], self.kernels[single]
        top = self.config.n_positions - 1
        active = settings.active

        def forward(token, index, keys, values, mask):  # one row: [], [], L x [H, S, K], [S]
            cache = KVCache(
                tuple(k[None] for k in keys), tuple(v[None] for v in values), mask[None], index
            )
            position = jnp.minimum(index, top)[None, None]  # steps past the end are junk
            with kernels.use(chosen), steered(steering):
                logits, cache = model.apply(
                    {"params": params}, token[None, None], position, cache=cache
                )
            return (
                logits[0, 0],
                tuple(k[0] for k in cache.keys),
                tuple(v[0] for v in cache.values),
                cache.mask[0],
            )

        def one_step(i, carry):
            slots, out = carry
            c = slots.cache
            logits, keys, values, mask = jax.vmap(forward)(
                slots.token, c.index, c.keys, c.values, c.mask
            )
            picked = choose(logits, slots.seen, slots.counts, settings, slots.keys, slots.step)
            cache = KVCache(keys, values, mask, jnp.where(active, c.index + 1, c.index))
            slots = _record(slots.replace(cache=cache), picked.token, active)
            out = jax.tree_util.tree_map(lambda o, p: o.at[:, i].set(p), out, picked)
            return slots, out

        rows = active.shape[0]
        out = Picked(
            token=jnp.zeros((rows, self.chunk), jnp.int32),
            logprob=jnp.zeros((rows, self.chunk), jnp.float32),
            top_ids=jnp.zeros((rows, self.chunk, TOP_LOGPROBS), jnp.int32),
            top_logprobs=jnp.zeros((rows, self.chunk, TOP_LOGPROBS), jnp.float32),
        )
        if self.chunk == 1:  # straight-line code: XLA copies a cache that enters a while loop
            return one_step(0, (slots, out))
        return jax.lax.fori_loop(0, self.chunk, one_step, (slots, out))


def _move(slots: Slots, src, dst) -> Slots:
    """Copy row `src` into row `dst` (the scheduler keeps busy rows first)."""
    return jax.tree_util.tree_map(lambda a: a.at[dst].set(a[src]), slots)


def _insert(slots: Slots, stage: Slots, row) -> Slots:
    """Copy the one-row `stage` (of the block's length: see `resize`) into row `row`."""
    return jax.tree_util.tree_map(lambda a, one: a.at[row].set(one[0]), slots, stage)


def _resize(slots: Slots, rows: int, length: int) -> Slots:
    """The block with `rows` rows (the first ones, or more free rows) of `length` slots."""

    def fit_keys(a):  # typed PRNG keys cannot be zero-filled: repeat the first row instead
        if a.shape[0] >= rows:
            return a[:rows]
        return jnp.concatenate([a, jnp.broadcast_to(a[:1], (rows - a.shape[0],))])

    def fit_rows(a):  # free rows are zeros
        if a.shape[0] >= rows:
            return a[:rows]
        return jnp.concatenate([a, jnp.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])

    slots = slots.replace(cache=slots.cache.with_length(length))
    return slots.replace(
        cache=jax.tree_util.tree_map(fit_rows, slots.cache),
        token=fit_rows(slots.token),
        seen=fit_rows(slots.seen),
        counts=fit_rows(slots.counts),
        keys=fit_keys(slots.keys),
        step=fit_rows(slots.step),
    )


def _copy_row(dst: KVCache, src: KVCache, row) -> KVCache:
    """Row `row` of `src` written into the one-row `dst` over the slots both have: a kept prefix
    taken from a block or a stage, or a kept prefix put into a new stage. `dst` is donated, so
    the result never shares a buffer with `src` (a later program may donate that one)."""
    n = min(dst.length, src.length)

    def copy(d, s, axis):  # d [1, ..., S_dst], s [B, ..., S_src], slots along `axis`
        one = jax.lax.slice_in_dim(jax.lax.dynamic_slice_in_dim(s, row, 1, axis=0), 0, n, axis=axis)
        return jax.lax.dynamic_update_slice_in_dim(d, one, 0, axis=axis)

    return dst.replace(
        keys=tuple(copy(d, s, 2) for d, s in zip(dst.keys, src.keys, strict=True)),
        values=tuple(copy(d, s, 2) for d, s in zip(dst.values, src.values, strict=True)),
        mask=copy(dst.mask, src.mask, 1),
    )


copy_row = jax.jit(_copy_row, donate_argnames="dst")
