"""Our forward pass against the logits Hugging Face transformers computed (golden fixtures)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt2cli
from gpt2cli.model import GPT2, KVCache


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_logits_match_transformers(name, golden, request):
    config, params = request.getfixturevalue(name)
    arrays = golden["arrays"]
    ours = np.asarray(gpt2cli.logits(config, params, arrays[f"{name}/input_ids"]))
    np.testing.assert_allclose(ours, arrays[f"{name}/logits"], atol=1e-4, rtol=0)


def test_inverse_layer_scaling_matters(tiny_a, golden):
    """The fixture would catch a model that ignored scale_attn_by_inverse_layer_idx."""
    config, params = tiny_a
    plain = config.replace(scale_attn_by_inverse_layer_idx=False)
    ours = np.asarray(gpt2cli.logits(plain, params, golden["arrays"]["tiny_a/input_ids"]))
    assert np.abs(ours - golden["arrays"]["tiny_a/logits"]).max() > 1e-2


def test_cached_forward_equals_full_forward(tiny_b):
    config, params = tiny_b
    model = GPT2(config)
    ids = jnp.arange(1, 11)[None] % config.vocab_size  # [1, 10]
    full, _ = model.apply({"params": params}, ids)
    cache = KVCache.empty(config, batch=1, length=16)
    prefill, cache = model.apply({"params": params}, ids[:, :7], cache=cache)
    steps = [prefill]
    for t in range(7, 10):
        out, cache = model.apply(
            {"params": params}, ids[:, t : t + 1], positions=jnp.array([[t]]), cache=cache
        )
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache.index) == 10


def test_padding_mask_hides_pad_tokens(tiny_b):
    """A left-padded row gives the same last logits as the unpadded prompt."""
    config, params = tiny_b
    model = GPT2(config)
    ids = jnp.array([[5, 6, 7]])
    alone, _ = model.apply({"params": params}, ids)
    padded = jnp.array([[0, 0, 5, 6, 7]])
    mask = jnp.array([[0, 0, 1, 1, 1]])
    positions = jnp.array([[0, 0, 0, 1, 2]])
    out, _ = model.apply({"params": params}, padded, positions=positions, attention_mask=mask)
    np.testing.assert_allclose(out[:, 2:], alone, atol=1e-5)


def test_dropout_only_when_not_deterministic(tiny_b):
    config, params = tiny_b
    model = GPT2(config)
    ids = jnp.array([[1, 2, 3, 4]])
    a, _ = model.apply({"params": params}, ids)
    b, _ = model.apply({"params": params}, ids)
    c, _ = model.apply(
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(0)}
    )
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_bfloat16_compute_stays_close(tiny_a, golden):
    config, params = tiny_a
    model = GPT2(config, dtype=jnp.bfloat16)
    ids = jnp.asarray(golden["arrays"]["tiny_a/input_ids"])
    out, _ = model.apply({"params": params}, ids)
    assert out.dtype == jnp.float32
    reference = golden["arrays"]["tiny_a/logits"]
    assert np.abs(np.asarray(out) - reference).max() < 0.1 * np.abs(reference).max()


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_bfloat16_products_match_numpy(rows, layout, backend):
    """Each bfloat16 product path (one row or several, either kernel layout, the CPU's
    workarounds or plain XLA products) agrees with numpy."""
    from gpt2cli.kernels import Kernels

    keys = jax.random.split(jax.random.key(0))
    x = jax.random.normal(keys[0], (rows, 64)).astype(jnp.bfloat16)
    kernel = jax.random.normal(keys[1], (48, 64)).astype(jnp.bfloat16)  # (out, in)
    expected = np.asarray(x, np.float32) @ np.asarray(kernel, np.float32).T
    chosen = Kernels(backend, "default", out_in=layout == "out_in", pad_one_row=True)
    out = chosen.linear(x, kernel if chosen.out_in else kernel.T)
    assert out.shape == (rows, 48) and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=5e-2)
