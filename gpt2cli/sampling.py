"""Logits processors and the one `pick` that turns logits into tokens: pure functions, traced
into the engine's and the server's jitted steps.

Semantics follow Hugging Face transformers, applied in its order: repetition penalty, then
temperature, top-k, top-p (nucleus), min-p, then a draw. Temperature 0 means greedy (argmax).
The server adds OpenAI's presence and frequency penalties and logit bias after HF's penalty.

Shapes: B rows, V vocabulary. Logits are float32 [B, V]; a draw also takes one PRNG key per
row ([B] keys), so a row draws the same numbers whether it runs alone or in a batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

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


def apply_min_p(logits: jax.Array, log_p) -> jax.Array:
    """Remove tokens whose probability is below p times the most likely token's probability;
    `log_p` is log(p), a float or one per row ([B, 1])."""
    # prob_i < p * prob_max  <=>  logit_i < logit_max + log(p)
    cutoff = jnp.max(logits, axis=-1, keepdims=True) + log_p
    return jnp.where(logits < cutoff, _REMOVED, logits)


@struct.dataclass(kw_only=True)
class Rule:
    """How `pick` turns logits into a token, in one of two forms.

    Python numbers: a frozen, hashable jit static (the engine's), so each rule compiles its own
    program and the steps it turns off are not traced at all. Arrays of one value per row
    ([B]; `logit_bias` [B, V]): data (the server's), so one program serves every mix of
    requests and skips on the device a step that no row asks for.
    """

    temperature: float | jax.Array = 0.0  # 0 = greedy
    top_k: int | jax.Array = 0  # 0 = off
    top_p: float | jax.Array = 1.0  # 1 = off
    log_min_p: float | jax.Array = -math.inf  # log(min_p); -inf = off
    repetition_penalty: float | jax.Array = 1.0  # HF's multiplicative penalty; 1 = off
    presence_penalty: float | jax.Array = 0.0  # OpenAI's additive penalties (need `counts`)
    frequency_penalty: float | jax.Array = 0.0
    logit_bias: jax.Array | None = None  # [B, V], added to the logits


def pick(logits, rule: Rule, keys, step, seen=None, counts=None) -> jax.Array:
    """Process the logits [B, V] by `rule` and draw one token per row -> [B] int32.

    `keys` [B] and `step` ([] or [B]) make each row's draw; `seen` [B, V] bool (prompt and
    generated tokens) feeds the repetition penalty, `counts` [B, V] (generated tokens) the
    presence and frequency penalties. A step that is off for a row leaves its logits
    bit-identical (x / 1, x - 0), so a row picks the same token under either form of a rule.
    """
    # a Python bool for a rule of numbers, a [B] bool array for a rule of arrays
    sampled = rule.temperature != 0.0
    penalized = (
        (rule.repetition_penalty != 1.0)
        | (rule.presence_penalty != 0.0)
        | (rule.frequency_penalty != 0.0)
    )

    def sample(x):  # the step's keys are made here, where a draw needs them
        step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(step, keys.shape))
        return draw(warp(x, rule), step_keys)

    def ruled():
        x = _penalize(logits, rule, seen, counts)
        if isinstance(sampled, bool):
            return sample(x) if sampled else _argmax(x)
        drawn = jax.lax.cond(
            jnp.any(sampled), lambda: sample(x), lambda: jnp.zeros(sampled.shape, jnp.int32)
        )
        return jnp.where(sampled, drawn, _argmax(x))

    def plain():  # every row greedy without penalties: the same tokens, fewer passes over [B, V]
        return _argmax(logits if rule.logit_bias is None else logits + rule.logit_bias)

    return _branch(sampled | penalized, ruled, plain)


def warp(logits: jax.Array, rule: Rule) -> jax.Array:
    """The logits of the distribution a row that samples draws from: temperature, top-k, top-p,
    min-p, in HF's order."""
    temperature = rule.temperature
    if not isinstance(temperature, int | float):  # greedy rows draw too, to be dropped: stay finite
        temperature = jnp.where(temperature == 0.0, 1.0, temperature)
    x = logits / _column(temperature)

    def top_k(x):
        if isinstance(rule.top_k, int):  # a constant k: XLA's top_k
            return apply_top_k(x, rule.top_k)
        return apply_top_k_rows(x, _column(rule.top_k))

    x = _where_wanted(rule.top_k != 0, top_k, x)
    x = _where_wanted(rule.top_p != 1.0, lambda x: apply_top_p(x, _column(rule.top_p)), x)
    return _where_wanted(
        rule.log_min_p != -math.inf, lambda x: apply_min_p(x, _column(rule.log_min_p)), x
    )


def _penalize(logits, rule: Rule, seen, counts):
    """The repetition, presence and frequency penalties, then the logit bias. Under an array
    rule every row takes every step (identities where off): one pass each, no selects."""
    x = logits
    if _traced(rule.repetition_penalty, 1.0):
        x = apply_repetition_penalty(x, seen, _column(rule.repetition_penalty))
    if _traced(rule.presence_penalty, 0.0) or _traced(rule.frequency_penalty, 0.0):
        presence, frequency = _column(rule.presence_penalty), _column(rule.frequency_penalty)
        x = x - presence * (counts > 0) - frequency * counts
    if rule.logit_bias is not None:
        x = x + rule.logit_bias
    return x


# A rule's value is a Python number (decided while tracing) or a [B] array (decided on the
# device). These helpers let `pick` say each step once for both.


def _traced(value, off) -> bool:
    """Whether a step is in the program: not for a number that says off; always for arrays."""
    return not isinstance(value, int | float) or value != off


def _column(value):
    """A number as it is; [B] -> [B, 1], one value per row of [B, V] logits."""
    return value if isinstance(value, int | float) else value[:, None]


def _branch(wanted, yes, no):
    """yes() if any row wants it, else no(): chosen while tracing for a Python bool, on the
    device (`lax.cond`) for an array, so no row pays for a step that none of them asks for."""
    if isinstance(wanted, bool):
        return yes() if wanted else no()
    return jax.lax.cond(jnp.any(wanted), yes, no)


def _where_wanted(wanted, apply, x):
    """`apply(x)` in the rows that want it (and only if some row does)."""
    if isinstance(wanted, bool):
        return apply(x) if wanted else x
    return jax.lax.cond(jnp.any(wanted), lambda: jnp.where(wanted[:, None], apply(x), x), lambda: x)


def _argmax(x: jax.Array) -> jax.Array:
    return jnp.argmax(x, axis=-1).astype(jnp.int32)


def draw(logits: jax.Array, keys: jax.Array) -> jax.Array:
    """One token per row with probability softmax(logits): [B, V], [B] keys -> [B] int32.

    By the inverse of the cumulative distribution: one uniform number per row, where a Gumbel
    draw (`jax.random.categorical`) would need V of them, which costs more than the search.
    """
    cumulative = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)  # [B, V]
    u = jax.vmap(jax.random.uniform)(keys)[:, None] * cumulative[:, -1:]  # [B, 1] in [0, total)
    return jnp.argmax(cumulative > u, axis=-1).astype(jnp.int32)  # first token past u
