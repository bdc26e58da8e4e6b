"""The precision policy and the backend kernels: each path on this CPU, each choice as a unit."""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from gpt2cli import kernels, precision
from gpt2cli.cli.app import app
from gpt2cli.errors import UserError
from gpt2cli.kernels import Kernels
from gpt2cli.model import GPT2, KVCache, layer_norm


def test_precision_table_and_its_one_check():
    assert precision.NAMES == ("float32", "tf32", "bfloat16")
    assert precision.get("float32").products == "highest"
    assert precision.get("tf32").compute == "float32"
    assert precision.get("tf32").products == "default"
    assert precision.get("bfloat16").compute == "bfloat16"
    with pytest.raises(UserError, match="dtype must be one of float32, tf32, bfloat16, got 'int8'"):
        precision.get("int8")


@pytest.mark.parametrize("command", ["generate", "bench", "chat", "eval", "train", "serve"])
def test_every_command_takes_tf32_and_refuses_other_dtypes_before_loading(command):
    result = CliRunner().invoke(app, [command, "--dtype", "int8", "--model", "/nonexistent"])
    # a usage error; train's settings may also come from a TOML file, so it checks them itself
    assert result.exit_code == (1 if command == "train" else 2)
    assert "float32, tf32, bfloat16" in result.output
    assert "tf32" in CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output


def _dot_precisions(config, params, dtype: str, attention: str = "einsum") -> list[str]:
    """The precision of every product in the compiled forward pass, from its StableHLO."""
    chosen = kernels.choose(precision.get(dtype))
    chosen = dataclasses.replace(chosen, attention_impl=attention)
    model = GPT2(config, dtype=jnp.dtype(precision.get(dtype).compute))

    def forward(params, ids):
        with kernels.use(chosen):
            return model.apply({"params": params}, ids)[0]

    text = jax.jit(forward).lower(params, jnp.zeros((2, 8), jnp.int32)).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*", text)
    assert len(dots) >= 4 * config.n_layer + 1  # qkv, proj, fc, proj per block, and the head
    return [m.group(1) if (m := re.search(r"precision = \[(\w+)", d)) else "none" for d in dots]


def test_float32_asks_every_product_for_full_precision(tiny_b):
    """On a GPU XLA would run float32 products in TF32 unless each one asks for HIGHEST."""
    config, params = tiny_b
    assert set(_dot_precisions(config, params, "float32")) == {"HIGHEST"}
    assert set(_dot_precisions(config, params, "tf32")) <= {"DEFAULT", "none"}
    # jax.nn.dot_product_attention's XLA form (ours where cuDNN does not run) asks the same
    assert set(_dot_precisions(config, params, "float32", attention="xla")) == {"HIGHEST"}


def test_model_outside_any_kernels_block_computes_in_full_float32(tiny_b):
    config, params = tiny_b
    text = jax.jit(lambda p, i: GPT2(config).apply({"params": p}, i)[0])
    hlo = text.lower(params, jnp.zeros((1, 4), jnp.int32)).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*", hlo)
    assert dots and all("HIGHEST" in d for d in dots)


def test_choices_per_backend():
    f32, bf16 = precision.get("float32"), precision.get("bfloat16")
    cpu_one_row = kernels.choose(f32, batch=1, backend="cpu")
    assert cpu_one_row.out_in and cpu_one_row.attention_impl == "einsum"
    assert not kernels.choose(f32, batch=8, backend="cpu").out_in
    assert not kernels.choose(bf16, batch=1, backend="cpu").out_in
    gpu = kernels.choose(bf16, batch=1, backend="gpu")
    assert gpu.attention_impl == "cudnn" and not gpu.out_in and gpu.backend == "gpu"
    assert gpu.cache_write == "first" and gpu.vocab_multiple == 64 and gpu.pad_one_row
    assert kernels.choose(bf16, backend="cpu").pad_one_row  # YNNPACK takes matrices only
    assert not kernels.choose(f32, batch=8, backend="cpu").pad_one_row
    assert gpu.cache_dtype(jnp.bfloat16) == jnp.bfloat16
    assert kernels.choose(bf16, backend="cpu").cache_dtype(jnp.bfloat16) == jnp.float32
    assert kernels.choose(f32, backend="gpu").attention_impl == "einsum"
    assert gpu.two_pass_variance  # one norm kernel, over two rows
    assert gpu.cache_rows(1) == 2 and gpu.cache_rows(8) == 8
    # a single row (serve's one-row blocks) keeps one pass: XLA makes scalar sums of it
    assert gpu.one_pass_variance(jnp.zeros((1, 1, 8))) and not gpu.one_pass_variance(
        jnp.zeros((2, 1, 8))
    )
    assert not kernels.choose(bf16, backend="gpu").two_pass_variance  # training: more bytes
    cpu = kernels.choose(bf16, batch=1, backend="cpu")
    assert not cpu.two_pass_variance and cpu.cache_rows(1) == 1


def test_two_pass_variance_stays_exact_where_the_one_pass_cancels(tiny_b):
    """Rows far from zero: E[x^2] - E[x]^2 loses the variance to float32 rounding, the second
    pass around the mean keeps it. So the choice does reach the model's norms."""
    config, _ = tiny_b
    x = (30 + np.random.default_rng(0).normal(size=(4, 64)) * 0.1).astype(np.float32)
    centred = x.astype(np.float64) - x.mean(-1, keepdims=True, dtype=np.float64)
    exact = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + config.layer_norm_epsilon)

    class Norm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layer_norm(x, config, jnp.float32, jnp.float32, "ln")

    errors = {}
    for two_pass in (False, True):
        with kernels.use(Kernels(two_pass_variance=two_pass)):  # read as the model is traced
            y = Norm().apply(Norm().init(jax.random.key(0), x), x)
        errors[two_pass] = np.abs(np.asarray(y) - exact).max()
    assert errors[True] < 1e-4 < 1e-2 < errors[False]


def test_fused_attention_applies_only_where_it_can():
    cudnn = Kernels(backend="gpu", attention_impl="cudnn")
    q16 = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
    q32 = q16.astype(jnp.float32)
    assert cudnn.fused_applies(q16, None, None, None)
    assert not cudnn.fused_applies(q32, None, None, None)  # cuDNN wants half precision
    assert not cudnn.fused_applies(q16, jnp.ones((1, 4), bool), None, None)  # padding
    assert not cudnn.fused_applies(q16, None, lambda p: p, None)  # attention dropout
    assert not cudnn.fused_applies(q16, None, None, (q16, q16))  # a KV cache
    assert not cudnn.fused_applies(jnp.zeros((1, 4, 2, 12), jnp.bfloat16), None, None, None)
    assert not Kernels(attention_impl="einsum").fused_applies(q16, None, None, None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_attention_call_equals_ours(tiny_b, golden, dtype):
    """jax.nn.dot_product_attention as the GPU calls it (layout, causal flag, scale), run by
    its XLA implementation here, gives our einsum attention's logits."""
    config, params = tiny_b
    ids = golden["arrays"]["tiny_b/input_ids"]
    compute = jnp.dtype(precision.get(dtype).compute)
    model = GPT2(config, dtype=compute)
    outs = {}
    for impl in ("einsum", "xla"):
        with kernels.use(Kernels(attention_impl=impl)):
            outs[impl] = np.asarray(model.apply({"params": params}, ids)[0])
    tolerance = 1e-5 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(outs["xla"], outs["einsum"], atol=tolerance)
    if dtype == "float32":
        np.testing.assert_allclose(outs["xla"], golden["arrays"]["tiny_b/logits"], atol=1e-4)


def test_gpu_kernels_run_the_cached_path_like_the_cpu_ones(tiny_b):
    """The plain XLA products (no CPU workarounds), the cache written before it is read and
    the two-pass norms give the same cached prefill and decode as the CPU's kernels."""
    config, params = tiny_b
    ids = jnp.arange(1, 9)[None] % config.vocab_size  # [1, 8]
    model = GPT2(config)
    results = []
    variants = (
        Kernels(backend="cpu"),
        Kernels(backend="gpu"),
        Kernels(backend="gpu", cache_write="first", vocab_multiple=64, pad_one_row=True),
        Kernels(backend="gpu", cache_write="first", two_pass_variance=True),
    )
    for chosen in variants:
        with kernels.use(chosen):
            cache = KVCache.empty(config, 1, 16)
            first, cache = model.apply({"params": params}, ids[:, :6], cache=cache)
            step, cache = model.apply(
                {"params": params}, ids[:, 6:7], positions=jnp.array([[6]]), cache=cache
            )
        results.append(np.concatenate([first, step], axis=1))
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-5)


@pytest.mark.parametrize("chunk", [8, 32])
def test_longer_decode_chunks_keep_transformers_greedy_tokens(tiny_a, golden, chunk):
    """A GPU decodes 32 tokens per device call: the tokens stay HF's."""
    from gpt2cli.engine import Engine, SamplingParams
    from gpt2cli.generate import TokenRun
    from tests.test_generate import check_continuation

    engine = Engine(*tiny_a, chunk=chunk)
    assert engine.chunk == chunk
    arrays = golden["arrays"]
    prompt = arrays["tiny_a/gen1/prompt_ids"].tolist()
    reference = arrays["tiny_a/gen1/tokens"].tolist()
    run = TokenRun(
        engine, [prompt], max_new_tokens=len(reference), sampling_params=SamplingParams()
    )
    ours = [int(column[0]) for column in run]
    check_continuation(ours, reference, arrays["tiny_a/gen1/margin"])


def test_one_row_decoded_as_two_keeps_transformers_greedy_tokens(tiny_a, golden):
    """A GPU decodes a single row as two identical rows (XLA's programs for two rows launch
    fewer kernels): the tokens stay HF's, both cache rows hold the same keys, and a prompt
    cache built so continues as a fresh run does."""
    from gpt2cli.engine import Engine
    from gpt2cli.generate import PromptCache, generate
    from gpt2cli.tokenizer import bundled
    from tests.test_generate import check_continuation

    tok = bundled()
    engine = Engine(*tiny_a, chosen=kernels.choose(batch=1, backend="gpu"))
    assert engine.kernels.cache_rows(1) == 2
    arrays = golden["arrays"]
    prompt = arrays["tiny_a/gen1/prompt_ids"].tolist()
    reference = arrays["tiny_a/gen1/tokens"].tolist()
    cache = PromptCache()
    first = generate(engine, tok, prompt, max_new_tokens=len(reference), prompt_cache=cache)
    check_continuation(first.tokens, reference, arrays["tiny_a/gen1/margin"])
    keys = np.asarray(cache.cache.keys[0])  # [2, H, S, K]
    assert keys.shape[0] == 2 and np.abs(keys[0]).sum() > 0
    np.testing.assert_array_equal(keys[1], keys[0])
    follow = prompt + first.tokens + tok.encode(" and")
    continued = generate(engine, tok, follow, max_new_tokens=8, prompt_cache=cache)
    assert continued.prefilled_tokens < len(follow)
    assert continued.tokens == generate(engine, tok, follow, max_new_tokens=8).tokens


def test_cache_written_first_keeps_batched_left_padded_generation(tiny_a, golden):
    """Prompts of different lengths share a batch by left padding; the GPU's cache order
    must hide the padding as the CPU's does."""
    from gpt2cli.engine import Engine, SamplingParams
    from gpt2cli.generate import TokenRun

    prompts = [golden["arrays"][f"tiny_a/gen{i}/prompt_ids"].tolist() for i in range(3)]
    assert len({len(p) for p in prompts}) > 1
    outputs = []
    for chosen in (None, Kernels(backend="gpu", cache_write="first")):
        engine = Engine(*tiny_a, chosen=chosen)
        run = TokenRun(engine, prompts, max_new_tokens=8, sampling_params=SamplingParams())
        outputs.append(np.array([column for column in run]))
    np.testing.assert_array_equal(outputs[1], outputs[0])


def test_padded_head_gives_the_same_logits_and_gradients():
    """The GPU pads the head's table to a multiple of 64 rows for big products: nothing of the
    padding may reach the logits or the table's gradient."""
    keys = jax.random.split(jax.random.key(1))
    rows = jax.random.normal(keys[0], (300, 32))  # big enough to pad
    table = jax.random.normal(keys[1], (1001, 32)) * 0.1  # 1001 rows: 23 of padding

    plain, padded = Kernels(backend="gpu"), Kernels(backend="gpu", vocab_multiple=64)
    np.testing.assert_allclose(padded.head(rows, table), plain.head(rows, table), atol=1e-5)
    assert padded.head(rows, table).shape == (300, 1001)
    grads = [
        jax.grad(lambda t, k=k: jnp.sum(jnp.sin(k.head(rows, t))))(table) for k in (plain, padded)
    ]
    assert grads[1].shape == table.shape
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-5)
