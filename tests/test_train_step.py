"""The training step's accelerator options: a loss in slices, per-block remat, prefetching."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2cli import kernels
from gpt2cli.model import GPT2
from gpt2cli.training.loop import Prefetcher
from gpt2cli.training.trainer import cross_entropy, token_loss


@pytest.fixture(scope="module")
def tokens(tiny_b):
    config, _ = tiny_b
    return jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 17)))


def _loss_and_grads(model, params, tokens, chunks, chosen=kernels.Kernels()):  # noqa: B008
    def loss(p):
        with kernels.use(chosen):
            return token_loss(model, p, tokens, None, True, loss_chunks=chunks)

    return jax.jit(jax.value_and_grad(loss))(params)


def test_training_loss_is_the_cross_entropy_of_transformers_logits(tiny_b, golden):
    """The loss of HF's golden inputs, from HF's logits in float64 (the outside truth)."""
    config, params = tiny_b
    arrays = golden["arrays"]
    ids = arrays["tiny_b/input_ids"]  # [2, 16]
    logits = arrays["tiny_b/logits"].astype(np.float64)[:, :-1]  # [2, 15, V]: predicts ids[:, 1:]
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]
    want = (logz - picked).mean()
    got = token_loss(GPT2(config), params, jnp.asarray(ids), None, True)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_cross_entropy_and_its_gradient_against_numpy():
    """Its value, and its gradient (softmax minus the target's one-hot), in float64 numpy; a
    column at LOWEST (a padded head's) gets no probability."""
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (3, 5, 40)).astype(np.float32)
    logits[..., -4:] = kernels.LOWEST
    targets = rng.integers(0, 36, (3, 5))
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(40)[targets]
    want = -np.log((p * onehot).sum(-1))
    got, grad = jax.value_and_grad(lambda z: cross_entropy(z, jnp.asarray(targets)).sum())(
        jnp.asarray(logits)
    )
    np.testing.assert_allclose(
        cross_entropy(jnp.asarray(logits), jnp.asarray(targets)), want, rtol=1e-5
    )
    np.testing.assert_allclose(float(got), want.sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, p - onehot, atol=1e-6)


def test_loss_in_slices_equals_the_whole_loss_and_its_gradients(tiny_b, tokens):
    """With the head run over 4 slices of the sequence (logits never all at once), the loss and
    every gradient equal the plain computation's."""
    config, params = tiny_b
    model = GPT2(config)
    whole, whole_grads = _loss_and_grads(model, params, tokens, 1)
    sliced, sliced_grads = _loss_and_grads(model, params, tokens, 4)
    np.testing.assert_allclose(sliced, whole, rtol=1e-6)
    assert float(whole) > 1.0  # a real loss, not a degenerate zero
    for a, b in zip(jax.tree.leaves(sliced_grads), jax.tree.leaves(whole_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_loss_over_a_padded_head_equals_the_plain_loss(tiny_b):
    """A GPU pads the head's table for big products (here 512 -> 576 rows) and the loss reads
    the padded logits, the padding masked: the loss and every gradient stay the plain head's."""
    config, params = tiny_b
    model = GPT2(config)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (32, 33)))
    plain = kernels.Kernels(backend="gpu")
    padded = kernels.Kernels(backend="gpu", vocab_multiple=96)
    table = params["wte"]["embedding"]
    assert padded.head(jnp.zeros((256, config.n_embd)), table, keep_padding=True).shape[-1] == 576
    for chunks in (1, 4):  # 1024 rows at once, or 4 slices of 256: both padded
        want, want_grads = _loss_and_grads(model, params, tokens, chunks, plain)
        got, got_grads = _loss_and_grads(model, params, tokens, chunks, padded)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_remat_changes_memory_not_results(tiny_b, tokens):
    config, params = tiny_b
    plain = _loss_and_grads(GPT2(config), params, tokens, 1)
    remat = _loss_and_grads(GPT2(config, remat=True), params, tokens, 1)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_remat_recomputes_the_blocks_in_the_backward_pass(tiny_b, tokens):
    config, params = tiny_b

    def grad_text(model):
        def loss(p):
            return token_loss(model, p, tokens, None, True)

        return jax.jit(jax.grad(loss)).lower(params).as_text()

    # jax.checkpoint leaves an optimization barrier per rematerialized block in the program
    assert grad_text(GPT2(config)).count("optimization_barrier") == 0
    assert grad_text(GPT2(config, remat=True)).count("optimization_barrier") >= config.n_layer


def test_the_softmax_max_takes_no_gradient(tiny_b, tokens):
    """Attention subtracts each row's max before the exps; a softmax does not change with the
    shift, so its gradient is zero and is not taken. Differentiating jnp.max would compare every
    score with it: a [B, H, T, T] boolean array per layer, written and read back."""
    config, params = tiny_b
    scores = (tokens.shape[0], config.n_head, tokens.shape[1] - 1, tokens.shape[1] - 1)

    def loss(p):
        with kernels.use(kernels.Kernels()):  # our einsum attention
            return token_loss(GPT2(config), p, tokens, None, True)

    def made(jaxpr, dtype):  # the primitives that make a [B, H, T, T] array of this dtype
        for eqn in jaxpr.eqns:
            if any(v.aval.shape == scores and v.aval.dtype == dtype for v in eqn.outvars):
                yield eqn.primitive.name
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from made(sub, dtype)

    program = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    assert "dot_general" in set(made(program, jnp.float32))  # the scores, found
    assert "eq" not in set(made(program, jnp.bool_))


def test_prefetcher_hands_out_batches_in_order_from_another_thread():
    made_on = []

    def make(step):
        made_on.append(threading.current_thread())
        return step * 10

    batches = Prefetcher(make, 3, 8)
    try:
        assert [batches.get(s) for s in range(3, 8)] == [30, 40, 50, 60, 70]
    finally:
        batches.close()
    assert threading.main_thread() not in made_on


def test_prefetcher_raises_a_failed_batch_in_the_loop_and_stops_early():
    def make(step):
        if step == 2:
            raise ValueError("the data ran out")
        return step

    batches = Prefetcher(make, 0, 1000, depth=2)
    assert batches.get(0) == 0 and batches.get(1) == 1
    with pytest.raises(ValueError, match="the data ran out"):
        batches.get(2)
    batches.close()
    stopped = Prefetcher(lambda s: s, 0, 10**9, depth=2)
    stopped.close()  # returns although a billion batches were still to come
    assert not stopped._thread.is_alive()
