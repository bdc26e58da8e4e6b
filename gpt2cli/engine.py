"""The compiled side of generation: a model's params in the compute dtype and its two programs.

`prefill` runs a bucketed block of prompt tokens into a fixed-size KV cache and samples the
first token; `decode` samples a few tokens per call inside one `fori_loop` over a small
`DecodeState` that stays on the device. `generate.py` drives them and turns tokens into text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import struct

from gpt2cli import sampling
from gpt2cli.config import GPT2Config
from gpt2cli.errors import UserError
from gpt2cli.model import GPT2, KVCache
from gpt2cli.sampling_checks import check_sampling, check_seed

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. temperature 0 = greedy; top_k 0, top_p 1, min_p 0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_sampling(
            self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty
        )
        check_seed(self.seed)

    @property
    def rule(self) -> tuple:
        """What the compiled step depends on (the seed is data, not code)."""
        if self.temperature == 0.0:
            return (0.0, 0, 1.0, 0.0, self.repetition_penalty)
        return (self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)


@struct.dataclass
class DecodeState:
    """Everything one decode step reads and writes, kept on the device between calls."""

    cache: KVCache
    token: jax.Array  # [B] int32: the last sampled token, the next input
    position: jax.Array  # [B] int32: its position id
    seen: jax.Array | None  # [B, V] bool: tokens so far, kept only for a repetition penalty
    keys: jax.Array  # [B] PRNG keys, one stream per row
    step: jax.Array  # [] int32: tokens sampled so far (folded into the keys)


def _pick(rule: tuple, logits, seen, keys, step) -> jax.Array:
    """Process the logits [B, V] and draw one token per row -> [B] int32."""
    temperature, top_k, top_p, min_p, penalty = rule
    for process in sampling.make_logits_processors(penalty):
        logits = process(logits, seen)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    return sampling.make_sampler(temperature, top_k, top_p, min_p)(logits, step_keys)


def _mark_seen(seen, token):
    if seen is None:
        return None
    return seen.at[jnp.arange(token.shape[0]), token].set(True)


class Engine:
    """A model ready to generate: params in the compute dtype and the jitted programs.

    Engines of the same config, dtype and chunk share their compiled programs.
    """

    def __init__(
        self,
        config: GPT2Config,
        params: dict,
        dtype: str = "float32",
        chunk: int = 4,
        out_in: bool = True,
    ):
        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.config = config
        self.dtype = dtype
        self.chunk = chunk  # tokens per decode call
        out_in = out_in and dtype == "float32"  # bfloat16 products want (in, out): see model.py
        self.params = _prepare(params, DTYPES[dtype], out_in)
        self.programs = _programs(config, dtype, chunk, out_in)

    def new_cache(self, batch: int, length: int) -> KVCache:
        # float32 in every dtype: XLA:CPU would widen a bfloat16 cache to a float32 copy for the
        # attention products at every step, which costs more than the cache's reads save.
        return KVCache.empty(self.config, batch, length, jnp.float32)


def _prepare(params: dict, dtype, out_in: bool) -> dict:
    """Params in the compute dtype, Dense kernels transposed to (out, in) if asked."""

    def leaf(path, a):
        a = jnp.asarray(a, dtype)
        return a.T if out_in and path[-1].key == "kernel" else a

    return jax.tree_util.tree_map_with_path(leaf, params)


@functools.lru_cache(maxsize=8)
def _programs(config: GPT2Config, dtype: str, chunk: int, out_in: bool) -> _Programs:
    return _Programs(config, dtype, chunk, out_in)


class _Programs:
    """The jitted prefill and decode of one (config, dtype, chunk)."""

    def __init__(self, config: GPT2Config, dtype: str, chunk: int, out_in: bool):
        compute = DTYPES[dtype]
        self.config = config
        self.chunk = chunk
        self.model = GPT2(config, dtype=compute, param_dtype=compute, out_in=out_in)
        self.traces = 0  # how many programs were traced: tests check nothing retraces
        self.prefill = jax.jit(self._prefill, static_argnames="rule", donate_argnames="cache")
        self.decode = jax.jit(self._decode, static_argnames="rule", donate_argnames="state")

    def _prefill(
        self, params, cache, ids, positions, mask, last, advance, seen, seed, rows, *, rule
    ):
        # ids, positions, mask: [B, T]; last: [B] column of each row's last real token;
        # advance: how many slots the cache keeps (T when left-padded, the real count if not).
        self.traces += 1
        start = cache.index
        logits, cache = self.model.apply(
            {"params": params}, ids, positions, mask, cache=cache, logits_at=last
        )  # [B, 1, V]
        cache = cache.replace(index=start + advance)
        batch = jnp.arange(ids.shape[0])
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(rows)  # [B]
        step = jnp.zeros((), jnp.int32)
        token = _pick(rule, logits[:, 0], seen, keys, step)  # [B]
        state = DecodeState(
            cache=cache,
            token=token,
            position=positions[batch, last] + 1,
            seen=_mark_seen(seen, token),
            keys=keys,
            step=step + 1,
        )
        return state, token[:, None]

    def _decode(self, params, state, *, rule):
        self.traces += 1
        top_position = self.config.n_positions - 1

        def one_step(i, carry):
            state, out = carry
            position = jnp.minimum(state.position, top_position)  # steps past the end are junk
            logits, cache = self.model.apply(
                {"params": params}, state.token[:, None], position[:, None], cache=state.cache
            )
            token = _pick(rule, logits[:, 0], state.seen, state.keys, state.step)  # [B]
            state = state.replace(
                cache=cache,
                token=token,
                position=state.position + 1,
                seen=_mark_seen(state.seen, token),
                step=state.step + 1,
            )
            return state, out.at[:, i].set(token)

        out = jnp.zeros((state.token.shape[0], self.chunk), jnp.int32)  # [B, chunk]
        if self.chunk == 1:  # straight-line code: XLA copies a cache that enters a while loop
            return one_step(0, (state, out))
        return jax.lax.fori_loop(0, self.chunk, one_step, (state, out))
