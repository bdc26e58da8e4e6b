"""Samplers and logits processors on small hand-made logits, against HF semantics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2cli.engine import SamplingParams
from gpt2cli.errors import UserError
from gpt2cli.sampling import (
    Rule,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    draw,
    pick,
    warp,
)

# probabilities 0.4, 0.3, 0.15, 0.1, 0.05 in a shuffled order
PROBS = np.array([0.15, 0.4, 0.05, 0.3, 0.1], np.float32)
LOGITS = jnp.log(jnp.asarray(PROBS))[None]  # [1, 5]


def kept(logits) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.asarray(logits)[0])).tolist())


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def sampler(rule: Rule):
    """`pick` at step 0 under `rule` as a jit static, as the engine runs it."""
    return jax.jit(lambda logits, row_keys: pick(logits, rule, row_keys, 0))


def test_top_k_keeps_the_k_most_likely():
    assert kept(apply_top_k(LOGITS, 1)) == {1}
    assert kept(apply_top_k(LOGITS, 3)) == {1, 3, 0}
    assert kept(apply_top_k(LOGITS, 99)) == {0, 1, 2, 3, 4}


def test_top_k_keeps_ties_with_the_kth():
    tied = jnp.asarray([[1.0, 3.0, 2.0, 2.0]])
    assert kept(apply_top_k(tied, 2)) == {1, 2, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert kept(apply_top_p(LOGITS, 0.5)) == {1, 3}  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    # HF drops a token when the mass above it reaches p. At p = 0.7 exactly (0.4 + 0.3) the
    # last bit of each backend's exp decides, so the test keeps clear of it on either side.
    assert kept(apply_top_p(LOGITS, 0.6999)) == {1, 3}
    assert kept(apply_top_p(LOGITS, 0.7001)) == {1, 3, 0}
    assert kept(apply_top_p(LOGITS, 0.1)) == {1}  # the top token always stays
    assert kept(apply_top_p(LOGITS, 1.0)) == {0, 1, 2, 3, 4}


def hf_top_p_kept(logits: np.ndarray, p: float) -> set[int]:
    """transformers' TopPLogitsWarper, in float64: sort ascending, drop the tokens whose
    cumulative probability is <= 1 - p, always keep the last (most likely) one."""
    order = np.argsort(logits, kind="stable")
    probs = np.exp(logits[order] - logits.max())
    cumulative = np.cumsum(probs / probs.sum())
    remove = cumulative <= 1 - p
    remove[-1] = False
    return set(order[~remove].tolist())


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_keeps_what_transformers_keeps_on_random_logits(p):
    rng = np.random.default_rng(int(p * 100))
    rows = rng.standard_normal((64, 2000)) * rng.uniform(0.1, 8.0, (64, 1))  # flat to peaked
    rows = rows.astype(np.float32)
    ours = np.asarray(apply_top_p(jnp.asarray(rows), p))
    exact = 0
    for row, mine in zip(rows, ours, strict=True):
        mine = set(np.flatnonzero(np.isfinite(mine)).tolist())
        # Our float32 sums differ from HF's float64 in the last bits, and from backend to
        # backend: a token whose mass lies within 1e-5 of the cut may go either way.
        row = row.astype(np.float64)
        assert hf_top_p_kept(row, p - 1e-5) <= mine <= hf_top_p_kept(row, p + 1e-5)
        exact += mine == hf_top_p_kept(row, p)
    assert exact >= 60  # of 64: the slack is for the rare near-tie


def test_min_p_scales_with_the_top_probability():
    assert kept(apply_min_p(LOGITS, math.log(0.5))) == {1, 3}  # >= 0.2
    assert kept(apply_min_p(LOGITS, math.log(0.3))) == {1, 3, 0}  # >= 0.12
    assert kept(apply_min_p(LOGITS, math.log(1.0))) == {1}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = jnp.asarray([[2.0, -2.0, 2.0, -2.0]])
    seen = jnp.asarray([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 2.0, -2.0]])
    assert pick(logits, Rule(), keys(1), 0, seen=seen).tolist() == [0]
    assert pick(logits, Rule(repetition_penalty=2.0), keys(1), 0, seen=seen).tolist() == [2]


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = jax.random.normal(jax.random.key(1), (6, 50))
    expected = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(sampler(Rule())(logits, keys(6)), expected)
    top1 = sampler(Rule(temperature=1.5, top_k=1))
    np.testing.assert_array_equal(top1(logits, keys(6, 3)), expected)


def test_sampled_frequencies_match_the_processed_distribution():
    rule = Rule(temperature=0.7, top_k=4, top_p=0.95, log_min_p=math.log(0.05))
    n = 20000
    logits = jnp.broadcast_to(LOGITS, (n, 5))
    draws = np.asarray(sampler(rule)(logits, keys(n, 7)))
    observed = np.bincount(draws, minlength=5) / n
    expected = np.asarray(jax.nn.softmax(warp(LOGITS, rule))[0])
    assert expected[2] == 0.0 and observed[2] == 0.0  # removed by top-k
    assert expected[4] > 0.0  # ... and the others survive
    np.testing.assert_allclose(observed, expected, atol=4 * np.sqrt(0.25 / n))


def test_a_draw_never_lands_on_a_removed_token_at_either_end():
    inf = float("inf")
    logits = jnp.asarray([[-inf, -inf, 0.0], [0.0, -inf, -inf], [-inf, 3.0, -inf]] * 300)
    np.testing.assert_array_equal(draw(logits, keys(900, 5)), [2, 0, 1] * 300)


def test_a_row_draws_the_same_token_alone_or_in_a_batch():
    sample = sampler(Rule(temperature=1.0))
    logits = jax.random.normal(jax.random.key(2), (4, 100))
    row_keys = keys(4, 9)
    together = np.asarray(sample(logits, row_keys))
    alone = [int(sample(logits[i : i + 1], row_keys[i : i + 1])[0]) for i in range(4)]
    assert together.tolist() == alone


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"temperature": -0.1}, "temperature must be between 0 and 100"),
        ({"temperature": 1e9}, "temperature must be between 0 and 100"),
        ({"temperature": float("nan")}, "temperature must be between"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"min_p": -0.5}, "min_p must be in [0, 1]"),
    ],
)
def test_bad_sampler_values_name_the_allowed_range(kwargs, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace("[", r"\[")):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("penalty", [0.0, -1.0, 1000.0])
def test_bad_repetition_penalty_names_the_range(penalty):
    with pytest.raises(UserError, match=r"repetition_penalty must be in \(0, 100\]"):
        SamplingParams(repetition_penalty=penalty)


RULES = [
    Rule(),
    Rule(repetition_penalty=1.3),
    Rule(temperature=0.9),
    Rule(temperature=1.0, top_k=20, top_p=0.9),
    Rule(temperature=0.7, log_min_p=math.log(0.05), repetition_penalty=1.3),
    Rule(temperature=1.2, top_k=3),
]


def test_a_rule_picks_the_same_tokens_as_numbers_or_as_per_row_arrays():
    """The engine's rule is a jit static of numbers, the server's one array per setting with a
    row per request: each row of a mixed batch picks the token its own static rule picks."""
    rows, vocab = len(RULES), 300
    logits = jax.random.normal(jax.random.key(3), (rows, vocab)) * 3
    seen = jax.random.bernoulli(jax.random.key(4), 0.1, (rows, vocab))
    row_keys, step = keys(rows, 11), jnp.full((rows,), 2, jnp.int32)
    fields = ("temperature", "top_k", "top_p", "log_min_p", "repetition_penalty")
    per_row = Rule(
        **{
            name: jnp.asarray(
                [getattr(r, name) for r in RULES], jnp.int32 if name == "top_k" else jnp.float32
            )
            for name in fields
        },
        presence_penalty=jnp.zeros(rows),
        frequency_penalty=jnp.zeros(rows),
        logit_bias=jnp.zeros((rows, vocab)),
    )
    counts = jnp.zeros((rows, vocab), jnp.int32)
    mixed = jax.jit(pick)(logits, per_row, row_keys, step, seen=seen, counts=counts)
    alone = [
        int(pick(logits[i : i + 1], rule, row_keys[i : i + 1], 2, seen=seen[i : i + 1])[0])
        for i, rule in enumerate(RULES)
    ]
    assert mixed.tolist() == alone
    assert len(set(alone)) > 2  # the rules really pick differently
