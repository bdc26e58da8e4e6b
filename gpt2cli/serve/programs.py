"""The server's compiled programs over a block of slots: one row of KV cache per request.

Unlike `engine.py`, where every row of a batch starts together and shares one write index,
a slot here is taken and freed at any time: each row keeps its own length (`cache.index` is
[B]), writes its keys at its own position, and carries its own sampling settings as arrays
(`RowSettings`), so a new mix of requests never recompiles. The model is the same `GPT2`: the
decode step runs it on one row under `jax.vmap`, which turns the shared write into a per-row
scatter, and the matrix products still read each weight once for all rows.

Shapes: B rows, S cache slots per row (the context window plus one prefill chunk), C prefill
chunk, V vocabulary, L logprobs kept per token (TOP_LOGPROBS).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gpt2cli import kernels, sampling
from gpt2cli.engine import Engine
from gpt2cli.model import KVCache

TOP_LOGPROBS = 20  # the most `top_logprobs` a request may ask for (OpenAI's limit)
SHORT_PREFILL = 32  # the narrower prefill block, for short prompts and prompts' last chunks


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
    """How each row samples, as arrays; the host builds them (see `settings_arrays`)."""

    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off
    log_min_p: jax.Array  # [B] float32: log(min_p), -inf = off
    repetition_penalty: jax.Array  # [B] float32, 1 = off (HF's multiplicative penalty)
    presence_penalty: jax.Array  # [B] float32, OpenAI's additive penalties, 0 = off
    frequency_penalty: jax.Array  # [B] float32
    logit_bias: jax.Array  # [B, V] float32, added to the logits
    top_logprobs: jax.Array  # [B] int32: how many top logprobs the row wants (0..L)
    active: jax.Array  # [B] bool: the row decodes (false: free, or still prefilling)


@struct.dataclass
class Picked:
    """What a step returns per row: the token, its logprob and the most likely alternatives."""

    token: jax.Array  # [...] int32
    logprob: jax.Array  # [...] float32, under the model's own distribution
    top_ids: jax.Array  # [..., L] int32
    top_logprobs: jax.Array  # [..., L] float32


def settings_arrays(rows: list[dict | None], vocab: int) -> RowSettings:
    """Host arrays for B rows; a row is a dict of `RowSettings` field values, or None (idle)."""
    b = len(rows)
    out = {
        "temperature": np.zeros(b, np.float32),
        "top_k": np.zeros(b, np.int32),
        "top_p": np.ones(b, np.float32),
        "log_min_p": np.full(b, -np.inf, np.float32),
        "repetition_penalty": np.ones(b, np.float32),
        "presence_penalty": np.zeros(b, np.float32),
        "frequency_penalty": np.zeros(b, np.float32),
        "logit_bias": np.zeros((b, vocab), np.float32),
        "top_logprobs": np.zeros(b, np.int32),
        "active": np.zeros(b, np.bool_),
    }
    for i, row in enumerate(rows):
        for name, value in (row or {}).items():
            if name == "logit_bias":
                for token, bias in value.items():
                    out[name][i, token] = bias
            else:
                out[name][i] = value
    return RowSettings(**out)


def pick(logits, seen, counts, s: RowSettings, keys, step) -> Picked:
    """Process each row's logits [B, V] with its own settings and draw one token per row.

    The same operations, in the same order, as `engine._pick` with `sampling`'s functions, so a
    row's tokens equal `gpt2 generate`'s with the same settings and seed. A setting that is off
    leaves the logits bit-identical (x / 1, x - 0, x + 0), and filters nobody uses are skipped.
    """
    col = lambda a: a[:, None]  # noqa: E731 - [B] -> [B, 1]
    logprobs = jax.nn.log_softmax(logits, axis=-1)  # the model's distribution, before any rule
    logits = sampling.apply_repetition_penalty(logits, seen, col(s.repetition_penalty))
    logits = logits - col(s.presence_penalty) * (counts > 0) - col(s.frequency_penalty) * counts
    logits = logits + s.logit_bias
    greedy = s.temperature == 0.0
    warped = logits / col(jnp.where(greedy, 1.0, s.temperature))

    def when(wanted, rule, x):
        """Apply `rule` to the rows that want it, and only if some row does."""
        return jax.lax.cond(jnp.any(wanted), lambda: jnp.where(col(wanted), rule(x), x), lambda: x)

    warped = when(s.top_k > 0, lambda x: sampling.apply_top_k_rows(x, col(s.top_k)), warped)
    warped = when(s.top_p < 1.0, lambda x: sampling.apply_top_p(x, col(s.top_p)), warped)
    cutoff = jnp.max(warped, axis=-1, keepdims=True) + col(s.log_min_p)  # as apply_min_p
    warped = jnp.where(warped < cutoff, -jnp.inf, warped)
    step_keys = jax.vmap(jax.random.fold_in)(keys, step)
    token = jnp.where(
        greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), sampling.draw(warped, step_keys)
    )
    rows = jnp.arange(token.shape[0])
    top_lp, top_ids = jax.lax.cond(
        jnp.any(s.top_logprobs > 0),
        lambda: tuple(jax.lax.top_k(logprobs, TOP_LOGPROBS)),
        lambda: (
            jnp.zeros((token.shape[0], TOP_LOGPROBS), jnp.float32),
            jnp.zeros((token.shape[0], TOP_LOGPROBS), jnp.int32),
        ),
    )
    return Picked(token, logprobs[rows, token], top_ids.astype(jnp.int32), top_lp)


def _record(slots: Slots, token, active) -> Slots:
    """Count a sampled token in the row's history (free rows are left alone)."""
    rows = jnp.arange(token.shape[0])
    return slots.replace(
        token=jnp.where(active, token, slots.token),
        seen=slots.seen.at[rows, token].set(slots.seen[rows, token] | active),
        counts=slots.counts.at[rows, token].add(active.astype(jnp.int32)),
        step=slots.step + active,
    )


class SlotPrograms:
    """The jitted programs over `Slots`: prefill one row's chunk, decode every row, move rows.

    The kernels (kernels.py) may differ by the rows computed together (on a CPU, float32
    weights stored (out, in) for one row), so a block of one row uses `one`, larger blocks
    `many`: each engine's params and kernels.
    """

    def __init__(self, one: Engine, many: Engine, chunk: int, prefill_chunk: int):
        self.one, self.many = one, many
        self.config = one.config
        self.chunk = chunk
        self.prefill_chunk = prefill_chunk
        self.length = self.config.n_positions + max(chunk, prefill_chunk)  # S
        self.models = {True: one.programs.model, False: many.programs.model}
        self.kernels = {True: one.kernels, False: many.kernels}
        self.prefill = jax.jit(self._prefill, static_argnames="single", donate_argnames="slots")
        self.decode = jax.jit(self._decode, static_argnames="single", donate_argnames="slots")
        self.move = jax.jit(_move, donate_argnames="slots")
        self.traces = 0

    @property
    def widths(self) -> list[int]:
        """Prefill block widths: a short prompt need not pay for a whole chunk."""
        return sorted({min(SHORT_PREFILL, self.prefill_chunk), self.prefill_chunk})

    def prefill_row(self, slots, settings, row, part, start, prompt, seed, sample):
        """Host side of `prefill`: arrays of fixed dtypes (a Python int where an int32 was
        traced would compile again), the narrowest width that holds `part`."""
        width = next(w for w in self.widths if w >= len(part))
        ids = np.zeros(width, np.int32)
        ids[: len(part)] = part
        seen = np.zeros(self.config.vocab_size, np.bool_)
        seen[prompt] = True
        rows = slots.token.shape[0]
        return self.prefill(
            self.params(rows),
            slots,
            settings,
            np.int32(row),
            ids,
            np.int32(start),
            np.int32(len(part)),
            seen,
            np.uint32(seed),
            np.int32(sample),
            single=rows == 1,
        )

    def params(self, rows: int):
        return (self.one if rows == 1 else self.many).params

    def empty(self, rows: int) -> Slots:
        cfg = self.config
        cache = self.one.new_cache(rows, self.length)
        return Slots(
            cache=cache.replace(index=jnp.zeros((rows,), jnp.int32)),
            token=jnp.zeros((rows,), jnp.int32),
            seen=jnp.zeros((rows, cfg.vocab_size), jnp.bool_),
            counts=jnp.zeros((rows, cfg.vocab_size), jnp.int32),
            keys=jax.vmap(jax.random.key)(jnp.zeros((rows,), jnp.uint32)),
            step=jnp.zeros((rows,), jnp.int32),
        )

    def _prefill(self, params, slots, settings, row, ids, start, n, seen, seed, sample, *, single):
        """Run tokens ids[:n] (of [C]) of row `row` from slot `start`; sample the next token.

        Only that row is computed: its cache is sliced out, extended and written back.
        """
        self.traces += 1
        model = self.models[single]
        top = self.config.n_positions - 1
        take = lambda a: jax.lax.dynamic_index_in_dim(a, row, keepdims=True)  # noqa: E731
        cache = KVCache(
            keys=tuple(map(take, slots.cache.keys)),
            values=tuple(map(take, slots.cache.values)),
            mask=take(slots.cache.mask),
            index=start,
        )
        width = ids.shape[0]
        positions = jnp.minimum(start + jnp.arange(width), top)[None]  # [1, C]
        mask = (jnp.arange(width) < n)[None]  # [1, C]
        with kernels.use(self.kernels[single]):
            logits, cache = model.apply(
                {"params": params}, ids[None], positions, mask, cache=cache, logits_at=(n - 1)[None]
            )  # [1, 1, V]
        put = lambda a, r: jax.lax.dynamic_update_index_in_dim(a, r, row, 0)  # noqa: E731
        slots = slots.replace(
            cache=KVCache(
                keys=tuple(map(put, slots.cache.keys, cache.keys)),
                values=tuple(map(put, slots.cache.values, cache.values)),
                mask=put(slots.cache.mask, cache.mask),
                index=slots.cache.index.at[row].set(start + n),
            )
        )
        key = jax.random.fold_in(jax.random.key(seed), sample)
        one_row = jax.tree_util.tree_map(take, settings)
        counts = jnp.zeros((1, seen.shape[0]), jnp.int32)
        picked = pick(logits[:, 0], seen[None], counts, one_row, key[None], jnp.zeros(1, jnp.int32))
        slots = slots.replace(
            token=slots.token.at[row].set(picked.token[0]),
            seen=slots.seen.at[row].set(seen.at[picked.token[0]].set(True)),
            counts=slots.counts.at[row].set(counts[0].at[picked.token[0]].set(1)),
            keys=slots.keys.at[row].set(key),
            step=slots.step.at[row].set(1),
        )
        return slots, jax.tree_util.tree_map(lambda a: a[0], picked)

    def _decode(self, params, slots, settings, *, single):
        """`chunk` tokens for every active row -> (slots, Picked with [B, chunk] leaves)."""
        self.traces += 1
        model, chosen = self.models[single], self.kernels[single]
        top = self.config.n_positions - 1
        active = settings.active

        def forward(token, index, keys, values, mask):  # one row: [], [], L x [H, S, K], [S]
            cache = KVCache(
                tuple(k[None] for k in keys), tuple(v[None] for v in values), mask[None], index
            )
            position = jnp.minimum(index, top)[None, None]  # steps past the end are junk
            with kernels.use(chosen):
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
            picked = pick(logits, slots.seen, slots.counts, settings, slots.keys, slots.step)
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


@functools.partial(jax.jit, static_argnames="rows")
def resize(slots: Slots, rows: int) -> Slots:
    """The first `rows` rows, or the block padded with free rows up to `rows`."""

    def fit(a):
        if a.shape[0] >= rows:
            return a[:rows]
        return jnp.concatenate([a, jnp.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])

    def fit_keys(a):  # typed PRNG keys cannot be zero-filled: repeat the first row instead
        if a.shape[0] >= rows:
            return a[:rows]
        return jnp.concatenate([a, jnp.broadcast_to(a[:1], (rows - a.shape[0],))])

    return slots.replace(
        cache=jax.tree_util.tree_map(fit, slots.cache),
        token=fit(slots.token),
        seen=fit(slots.seen),
        counts=fit(slots.counts),
        keys=fit_keys(slots.keys),
        step=fit(slots.step),
    )
