"""The compiled side of generation: a model's params in the compute dtype and its two programs.

`prefill` runs a bucketed block of prompt tokens into a fixed-size KV cache and samples the
first token; `decode` samples a few tokens per call inside one `fori_loop` over a small
`DecodeState` that stays on the device; `decode_run` samples a whole run's tokens in one call.
`generate.py` drives them and turns tokens into text.

An engine may steer what it generates (`Steering`: activation addition at one block's input).
The programs take the steering as an argument, its vector an array and its layer part of the
argument's structure, so a new vector or scale reuses the compiled programs; without steering
(or at scale 0) the argument is None and the programs are exactly the unsteered ones.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import struct

from gpt2cli import hooks, kernels, precision, sampling
from gpt2cli.config import GPT2Config
from gpt2cli.errors import ParameterError
from gpt2cli.model import GPT2, KVCache
from gpt2cli.sampling_checks import check_sampling, check_seed

# Tokens per decode call. A CPU step is slow enough that 4 hide the call's cost; a GPU step is
# so short that the launches between calls would leave it idle.
DECODE_CHUNK = {"cpu": 4}
DEFAULT_DECODE_CHUNK = 32
# Cache lengths are multiples of this: fewer compiles against less attention over empty slots.
# A GPU decoding many rows spends most of a step reading the cache (64 rows x 512 slots of
# GPT-2 124M: 1.2 GB, the weights 0.25 GB), so its block is finer.
CACHE_BLOCK = {"cpu": 256}
DEFAULT_CACHE_BLOCK = 128
# Backends that decode a run nobody streams in one call (`decode_run`), not chunk by chunk: a
# GPU then launches one program per run. A CPU keeps its chunks: their calls cost it nothing.
CHUNKED_RUNS = {"cpu"}


@dataclass(frozen=True, kw_only=True)
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
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
        )
        check_seed(self.seed)

    @property
    def rule(self) -> sampling.Rule:
        """What the compiled step depends on, a jit static (the seed is data, not code)."""
        penalty = self.repetition_penalty
        if self.temperature == 0.0:  # greedy: the draw's settings would only add programs
            return sampling.Rule(repetition_penalty=penalty)
        return sampling.Rule(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            log_min_p=math.log(self.min_p) if self.min_p > 0.0 else -math.inf,
            repetition_penalty=penalty,
        )


@struct.dataclass
class Steering:
    """Steer generation: add `scale` x `vector` [D] to the residual stream entering block
    `layer` (`blocks.{layer}.resid_pre`, where `lens.direction` takes its vectors) at every
    position, in the prefill and in every decode step."""

    layer: int = struct.field(pytree_node=False)
    vector: jax.Array  # [D]
    scale: jax.Array | float = 1.0

    def checked(self, config: GPT2Config) -> Steering | None:
        """This steering for a model of `config`, as float32 arrays (None at scale 0)."""
        if not 0 <= self.layer < config.n_layer:
            raise ParameterError("layer", f"must lie in [0, {config.n_layer}), got {self.layer}")
        vector = jnp.asarray(self.vector, jnp.float32)
        if vector.shape != (config.n_embd,):
            raise ParameterError(
                "vector", f"must be [n_embd] = [{config.n_embd}], got {vector.shape}"
            )
        if self.scale == 0:
            return None
        return self.replace(vector=vector, scale=jnp.float32(self.scale))


def steered(steering: Steering | None):
    """The context to trace the model in: with `steering`, its vector joins the residual stream
    at its block's input; without, the model's hook points stay the identity."""
    if steering is None:
        return contextlib.nullcontext()
    add = hooks.AddVector(steering.vector, steering.scale)
    return hooks.recording(hooks={f"blocks.{steering.layer}.resid_pre": [add]})


@struct.dataclass
class PromptBlock:
    """A prefill's inputs besides the cache: a block of prompt tokens and how to read it."""

    ids: jax.Array  # [B, T] int32, padded
    positions: jax.Array  # [B, T] int32
    mask: jax.Array  # [B, T]: 1 on real tokens
    last: jax.Array  # [B]: the column of each row's last real token
    advance: jax.Array  # [] int32: slots the cache keeps (T when left-padded, else the real count)
    seen: jax.Array | None  # [B, V] bool: the prompt's tokens, only for a repetition penalty
    seed: jax.Array  # [] uint32
    rows: jax.Array  # [B] int32: each row's random stream of the seed (its sample index)


@struct.dataclass
class DecodeState:
    """Everything one decode step reads and writes, kept on the device between calls."""

    cache: KVCache
    token: jax.Array  # [B] int32: the last sampled token, the next input
    position: jax.Array  # [B] int32: its position id
    seen: jax.Array | None  # [B, V] bool: tokens so far, kept only for a repetition penalty
    keys: jax.Array  # [B] PRNG keys, one stream per row
    step: jax.Array  # [] int32: tokens sampled so far (folded into the keys)


def _mark_seen(seen, token):
    if seen is None:
        return None
    return seen.at[jnp.arange(token.shape[0]), token].set(True)


class Engine:
    """A model ready to generate: params in the compute dtype and the jitted programs.

    `dtype` is a precision's name (precision.py); `batch`, the rows it will mostly decode, picks
    the weight layout (kernels.py). Engines of the same config, kernels and chunk share their
    compiled programs. `whole_runs`: a run that is not streamed decodes in one call;
    `cache_block`: KV cache lengths are multiples of it. `steering`: what the engine adds while
    it generates (see `Steering`); its programs take `engine.steering` as their argument.
    """

    def __init__(
        self,
        config: GPT2Config,
        params: dict,
        dtype: str = "float32",
        chunk: int | None = None,
        batch: int = 1,
        chosen: kernels.Kernels | None = None,  # instead of the kernels.choose() of this batch
        steering: Steering | None = None,
    ):
        policy = precision.get(dtype)
        self.config = config
        self.dtype = dtype
        self.kernels = chosen or kernels.choose(policy, batch=batch)
        self.chunk = chunk or DECODE_CHUNK.get(self.kernels.backend, DEFAULT_DECODE_CHUNK)
        self.whole_runs = self.kernels.backend not in CHUNKED_RUNS
        self.cache_block = CACHE_BLOCK.get(self.kernels.backend, DEFAULT_CACHE_BLOCK)
        self.params = _prepare(params, policy.compute, self.kernels.out_in)
        self.programs = _programs(config, policy.compute, self.kernels, self.chunk)
        self.steering = None if steering is None else steering.checked(config)

    def new_cache(self, batch: int, length: int) -> KVCache:
        dtype = self.kernels.cache_dtype(self.params["wte"]["embedding"].dtype)
        return KVCache.empty(self.config, batch, length, dtype)


def _prepare(params: dict, dtype: str, out_in: bool) -> dict:
    """Params in the compute dtype, Dense kernels transposed to (out, in) if asked."""

    def leaf(path, a):
        a = jnp.asarray(a, dtype)
        return a.T if out_in and path[-1].key == "kernel" else a

    return jax.tree_util.tree_map_with_path(leaf, params)


@functools.lru_cache(maxsize=8)
def _programs(config: GPT2Config, compute: str, chosen: kernels.Kernels, chunk: int):
    return _Programs(config, compute, chosen, chunk)


class _Programs:
    """The jitted prefill and decodes of one (config, compute dtype, kernels, chunk)."""

    def __init__(self, config: GPT2Config, compute: str, chosen: kernels.Kernels, chunk: int):
        self.config = config
        self.chunk = chunk
        self.kernels = chosen
        self.model = GPT2(config, dtype=jnp.dtype(compute), param_dtype=jnp.dtype(compute))
        self.traces = 0  # how many programs were traced: tests check nothing retraces
        self.prefill = chosen.jit(self._prefill, static_argnames="rule", donate_argnames="cache")
        self.decode = chosen.jit(self._decode, static_argnames="rule", donate_argnames="state")
        self.decode_run = chosen.jit(
            self._decode_run, static_argnames=("rule", "length"), donate_argnames="state"
        )

    def _prefill(self, params, cache, block: PromptBlock, steering=None, *, rule):
        """Run `block` into the cache and sample the first token -> (state, tokens [B, 1])."""
        self.traces += 1
        start = cache.index
        logits, cache = self._forward(
            params, steering, block.ids, block.positions, cache, block.mask, block.last
        )  # [B, 1, V]
        cache = cache.replace(index=start + block.advance)
        batch = jnp.arange(block.ids.shape[0])
        seed = jax.random.key(block.seed)
        keys = jax.vmap(lambda r: jax.random.fold_in(seed, r))(block.rows)  # [B]
        step = jnp.zeros((), jnp.int32)
        token = sampling.pick(logits[:, 0], rule, keys, step, seen=block.seen)  # [B]
        state = DecodeState(
            cache=cache,
            token=token,
            position=block.positions[batch, block.last] + 1,
            seen=_mark_seen(block.seen, token),
            keys=keys,
            step=step + 1,
        )
        return state, token[:, None]

    def _decode(self, params, state, steering=None, *, rule):
        """The next `chunk` tokens -> the state after them, the tokens [B, chunk]."""
        self.traces += 1
        out = jnp.zeros((state.token.shape[0], self.chunk), jnp.int32)  # [B, chunk]
        step = functools.partial(self._step, params, steering, rule)
        if self.chunk == 1:  # straight-line code: XLA copies a cache that enters a while loop
            return step(0, (state, out))
        return jax.lax.fori_loop(0, self.chunk, step, (state, out))

    def _decode_run(self, params, state, count, steering=None, *, rule, length):
        """The next `count` tokens in one call, rounded up to whole chunks -> the state after
        them, the tokens [B, length] (columns past the last chunk are zeros). `count` is data,
        so a program serves every count up to its `length`.

        A loop over chunks of a loop over one chunk's steps: XLA:GPU runs a loop whose trip
        count is data by reading its condition back to the host after every iteration, which
        would stall the device once per token; the inner loop's trip count is known, so that
        happens once per chunk only.
        """
        self.traces += 1
        out = jnp.zeros((state.token.shape[0], length), jnp.int32)  # [B, length]

        def chunk(c, carry):
            def step(i, carry):
                return self._step(params, steering, rule, c * self.chunk + i, carry)

            return jax.lax.fori_loop(0, self.chunk, step, carry)

        chunks = (count + self.chunk - 1) // self.chunk
        return jax.lax.fori_loop(0, chunks, chunk, (state, out))

    def _forward(self, params, steering, ids, positions, cache, mask=None, logits_at=None):
        """The model on ids [B, T], steered if asked -> (logits [B, T or 1, V], cache). A cache
        of more rows than B (one row decoded as two, `Kernels.cache_rows`) runs the row on each
        of them."""
        rows, cached = ids.shape[0], cache.mask.shape[0]
        if cached != rows:
            ids, positions, mask, logits_at = (
                None if a is None else jnp.broadcast_to(a, (cached, *a.shape[1:]))
                for a in (ids, positions, mask, logits_at)
            )
        with kernels.use(self.kernels), steered(steering):
            logits, cache = self.model.apply(
                {"params": params}, ids, positions, mask, cache=cache, logits_at=logits_at
            )
        return logits[:rows], cache

    def _step(self, params, steering, rule, i, carry):
        """Sample one token per row and write it to column i of `out`."""
        state, out = carry
        # steps past the last position only happen in a chunk's junk columns, never read
        position = jnp.minimum(state.position, self.config.n_positions - 1)
        logits, cache = self._forward(
            params, steering, state.token[:, None], position[:, None], state.cache
        )
        token = sampling.pick(logits[:, 0], rule, state.keys, state.step, seen=state.seen)
        state = state.replace(
            cache=cache,
            token=token,
            position=state.position + 1,
            seen=_mark_seen(state.seen, token),
            step=state.step + 1,
        )
        return state, out.at[:, i].set(token)
