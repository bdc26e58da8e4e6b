"""Logits processors and samplers: pure functions, built once as closures and traced into jit.

Semantics follow Hugging Face transformers, applied in its order: repetition penalty, then
temperature, top-k, top-p (nucleus), min-p, then a draw. Temperature 0 means greedy (argmax).

Shapes: B rows, V vocabulary. Logits are float32 [B, V]; a sampler also takes one PRNG key
per row ([B] keys), so a row draws the same numbers whether it runs alone or in a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gpt2cli.sampling_checks import check_sampling

Sampler = Callable[[jax.Array, jax.Array], jax.Array]  # (logits [B, V], keys [B]) -> ids [B]
LogitsProcessor = Callable[[jax.Array, jax.Array], jax.Array]  # (logits, seen [B, V]) -> logits

_REMOVED = -jnp.inf


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF semantics: a seen token's logit is divided by `penalty` if positive, else multiplied."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def apply_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k highest logits (and any tied with the k-th), remove the rest."""
    k = min(k, logits.shape[-1])
    # The smallest of the top k (slicing out the last one instead makes XLA:CPU sort everything)
    kth = jnp.min(jax.lax.top_k(logits, k)[0], axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(logits < kth, _REMOVED, logits)


def apply_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one).

    HF removes a token when the probability of all tokens ranked at or below it is <= 1 - p,
    which is the same as: the probability of the tokens ranked above it is < p. So the lowest
    kept logit is the highest logit value t whose tokens at or above t hold at least p. Rather
    than sort the vocabulary (slow on CPU), t is found by bisection over the 32-bit patterns of
    the logits, ordered as the floats are: 32 masked sums, exact.
    """
    probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
    order = _float_order(logits)  # [B, V] uint32, ordered as the logits

    def enough(t):  # [B, 1] -> [B, 1]: do the tokens at or above t hold at least p?
        return jnp.sum(jnp.where(order >= t, probs, 0.0), axis=-1, keepdims=True) >= p

    return jnp.where(order < _highest_enough(order, enough), _REMOVED, logits)


def apply_top_k_rows(logits: jax.Array, k: jax.Array) -> jax.Array:
    """`apply_top_k` with a k per row (k [B, 1], each >= 1) given as data, not a constant.

    The k-th highest logit is the highest value t with at least k logits at or above it: the
    same bisection as `apply_top_p`, counting tokens instead of summing probabilities.
    """
    order = _float_order(logits)  # [B, V]

    def enough(t):
        return jnp.sum(order >= t, axis=-1, keepdims=True) >= k

    return jnp.where(order < _highest_enough(order, enough), _REMOVED, logits)


def _highest_enough(order: jax.Array, enough) -> jax.Array:
    """The highest t [B, 1] (a value of `order` [B, V]) with enough(t), for an `enough` that
    holds at each row's lowest value and only gets harder as t rises."""

    def halve(_, bounds):  # invariant: enough(low) and not enough(high)
        low, high = bounds
        middle = low + (high - low) // 2
        ok = enough(middle)
        return jnp.where(ok, middle, low), jnp.where(ok, high, middle)

    top = jnp.max(order, axis=-1, keepdims=True)
    low = jnp.min(order, axis=-1, keepdims=True)
    low, _ = jax.lax.fori_loop(0, 32, halve, (low, top + 1))  # 32 halvings: one value left
    return low


def _float_order(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (negative floats' bits flipped, sign bit set on the
    others), so that a bisection over integers walks the floats."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = bits >> 31 == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def apply_min_p(logits: jax.Array, p: float) -> jax.Array:
    """Remove tokens whose probability is below p times the most likely token's probability."""
    return apply_min_p_rows(logits, math.log(p))


def apply_min_p_rows(logits: jax.Array, log_p) -> jax.Array:
    """`apply_min_p` with log(p) given, a float or one per row ([B, 1])."""
    # prob_i < p * prob_max  <=>  logit_i < logit_max + log(p)
    cutoff = jnp.max(logits, axis=-1, keepdims=True) + log_p
    return jnp.where(logits < cutoff, _REMOVED, logits)


def make_logits_processors(repetition_penalty: float = 1.0) -> list[LogitsProcessor]:
    """Processors that look at the tokens seen so far (prompt and generated)."""
    check_sampling(repetition_penalty=repetition_penalty)
    if repetition_penalty == 1.0:
        return []
    return [lambda logits, seen: apply_repetition_penalty(logits, seen, repetition_penalty)]


def warp_logits(
    logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> jax.Array:
    """The logits of the distribution a sampler draws from (temperature > 0)."""
    logits = logits / temperature
    if top_k > 0:
        logits = apply_top_k(logits, top_k)
    if top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    if min_p > 0.0:
        logits = apply_min_p(logits, min_p)
    return logits


def make_sampler(
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> Sampler:
    """A function (logits [B, V], keys [B]) -> token ids [B] int32."""
    check_sampling(temperature, top_k, top_p, min_p)
    if temperature == 0.0:
        return lambda logits, keys: jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(logits: jax.Array, keys: jax.Array) -> jax.Array:
        return draw(warp_logits(logits, temperature, top_k, top_p, min_p), keys)

    return sample


def draw(logits: jax.Array, keys: jax.Array) -> jax.Array:
    """One token per row with probability softmax(logits): [B, V], [B] keys -> [B] int32.

    By the inverse of the cumulative distribution: one uniform number per row, where a Gumbel
    draw (`jax.random.categorical`) would need V of them, which costs more than the search.
    """
    cumulative = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)  # [B, V]
    u = jax.vmap(jax.random.uniform)(keys)[:, None] * cumulative[:, -1:]  # [B, 1] in [0, total)
    return jnp.argmax(cumulative > u, axis=-1).astype(jnp.int32)  # first token past u
