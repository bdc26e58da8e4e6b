"""Named activations and interventions (gpt2cli.lens) against transformers' hidden states and
attentions (tests/fixtures/lens.npz) and a numpy GPT-2 written here for the ablations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt2cli
from gpt2cli import hooks, lens
from gpt2cli.errors import UserError
from gpt2cli.model import GPT2, KVCache
from tests.conftest import FIXTURES


@pytest.fixture(scope="session")
def inside() -> dict:
    with np.load(FIXTURES / "lens.npz", allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def identity(x, name):
    return x


@pytest.fixture(scope="session")
def b_ids(golden):
    return golden["arrays"]["tiny_b/input_ids"]  # [2, 16]


# ---- faithful to transformers ------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_residual_streams_and_patterns_equal_transformers(name, golden, inside, request):
    config, params = request.getfixturevalue(name)
    ids = golden["arrays"][f"{name}/input_ids"]
    logits, cache = gpt2cli.run_with_cache(
        config,
        params,
        ids,
        names=["blocks.*.resid_pre", "blocks.*.resid_post", "*.pattern", "ln_final.*"],
    )
    hidden = inside[f"{name}/hidden_states"]  # [L + 1, B, T, D]: embeddings, ..., ln_f(last)
    last = config.n_layer - 1
    for i in range(config.n_layer):
        np.testing.assert_allclose(cache[f"blocks.{i}.resid_pre"], hidden[i], atol=1e-5)
        want = inside[f"{name}/last_block_out"] if i == last else hidden[i + 1]
        np.testing.assert_allclose(cache[f"blocks.{i}.resid_post"], want, atol=1e-5)
        pattern = inside[f"{name}/attentions"][i]  # [B, H, T, T]
        np.testing.assert_allclose(cache[f"blocks.{i}.attn.pattern"], pattern, atol=1e-5)
    np.testing.assert_allclose(cache["ln_final.normalized"], hidden[-1], atol=1e-5)
    np.testing.assert_allclose(logits, golden["arrays"][f"{name}/logits"], atol=1e-4)


def test_the_lens_at_the_last_layer_is_the_models_logits(tiny_b, b_ids):
    config, params = tiny_b
    lens_logits = lens.lens_logits(config, params, b_ids)  # [L + 1, B, T, V]
    assert lens_logits.shape == (config.n_layer + 1, 2, 16, 512)
    np.testing.assert_array_equal(lens_logits[-1], gpt2cli.logits(config, params, b_ids))
    assert not np.allclose(lens_logits[-2], lens_logits[-1], atol=1e-2)  # each row its own
    top = lens.logit_lens(config, params, b_ids, top_k=3)
    assert top.names[0] == "blocks.0.resid_pre" and top.names[-1] == "blocks.2.resid_post"
    probs = jax.nn.softmax(lens_logits, axis=-1)
    np.testing.assert_allclose(top.probs, jax.lax.top_k(probs, 3)[0], rtol=1e-6)
    np.testing.assert_array_equal(top.ids[..., 0], np.argmax(lens_logits, axis=-1))


# ---- a numpy GPT-2: the outside truth for ablations --------------------------------------


def numpy_gpt2(config, params, ids, zero_heads=()):
    """GPT-2 in float64 numpy from the fixture weights, with (layer, head) outputs zeroed."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    erf = np.vectorize(math.erf)
    gelu = {"gelu": lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))}[config.activation_function]

    def norm(x, ln):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + config.layer_norm_epsilon) * ln["scale"] + ln["bias"]

    def dense(x, layer):
        return x @ layer["kernel"] + layer["bias"]

    B, T = ids.shape
    H, K = config.n_head, config.head_dim
    x = p["wte"]["embedding"][ids] + p["wpe"]["embedding"][np.arange(T)]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(config.n_layer):
        block = p[f"h_{i}"]
        qkv = dense(norm(x, block["ln_1"]), block["attn"]["c_attn"])
        q, k, v = (a.reshape(B, T, H, K) for a in np.split(qkv, 3, axis=-1))
        scores = np.einsum("bthk,buhk->bhtu", q, k) / math.sqrt(K)
        scores = np.where(causal, scores, -np.inf)
        pattern = np.exp(scores - scores.max(-1, keepdims=True))
        pattern /= pattern.sum(-1, keepdims=True)
        z = np.einsum("bhtu,buhk->bthk", pattern, v)
        for layer, head in zero_heads:
            if layer == i:
                z[:, :, head] = 0
        x = x + dense(z.reshape(B, T, H * K), block["attn"]["c_proj"])
        h = gelu(dense(norm(x, block["ln_2"]), block["mlp"]["c_fc"]))
        x = x + dense(h, block["mlp"]["c_proj"])
    return norm(x, p["ln_f"]) @ p["wte"]["embedding"].T


def test_zero_ablated_head_equals_numpy(tiny_b, b_ids, golden):
    config, params = tiny_b
    assert not config.scale_attn_by_inverse_layer_idx  # numpy_gpt2 does not scale by layer
    plain = numpy_gpt2(config, params, b_ids)
    np.testing.assert_allclose(plain, golden["arrays"]["tiny_b/logits"], atol=1e-4)
    ablations = {
        "blocks.1.attn.z": gpt2cli.lens.zero_head(1, 2),
        "blocks.2.attn.z": lens.zero_head(2, 0),
    }
    ablated = gpt2cli.run_with_hooks(config, params, b_ids, hooks=ablations)
    want = numpy_gpt2(config, params, b_ids, zero_heads=[(1, 2), (2, 0)])
    assert np.abs(want - plain).max() > 0.1  # the ablation changes the logits
    np.testing.assert_allclose(ablated, want, atol=1e-4)


def test_zero_head_refuses_another_point_and_a_head_out_of_range(tiny_b, b_ids):
    config, params = tiny_b
    with pytest.raises(
        UserError,
        match=r"zero_head\(1, 2\) changes blocks.1.attn.z, but was hooked on blocks.0.attn.z",
    ):
        gpt2cli.run_with_hooks(
            config, params, b_ids, hooks={"blocks.0.attn.z": lens.zero_head(1, 2)}
        )
    with pytest.raises(UserError, match=r"head must lie in \[0, 4\), got 4"):
        gpt2cli.run_with_hooks(
            config, params, b_ids, hooks={"blocks.1.attn.z": lens.zero_head(1, 4)}
        )


def test_mean_ablation_sets_the_head_to_its_mean(tiny_b, b_ids):
    config, params = tiny_b
    name = "blocks.1.attn.z"
    _, reference = gpt2cli.run_with_cache(config, params, b_ids, names=[name])
    mean = np.asarray(reference[name])[:, :, 3].mean(axis=(0, 1))  # [K]
    hook = lens.mean_head(1, 3, reference[name])
    _, cache = gpt2cli.run_with_cache(config, params, b_ids[:1], names=[name], hooks={name: hook})
    z = np.asarray(cache[name])
    np.testing.assert_allclose(z[0, :, 3], np.broadcast_to(mean, (16, config.head_dim)), rtol=1e-6)
    np.testing.assert_array_equal(z[:, :, :3], np.asarray(reference[name])[:1, :, :3])


# ---- names, globs, caching ---------------------------------------------------------------


def test_globs_select_and_only_what_is_asked_is_kept(tiny_b, b_ids):
    config, params = tiny_b
    _, cache = gpt2cli.run_with_cache(config, params, b_ids, names=["blocks.*.attn.pattern"])
    assert list(cache) == [f"blocks.{i}.attn.pattern" for i in range(3)]
    assert cache["blocks.0.attn.pattern"].shape == (2, 4, 16, 16)
    _, cache = gpt2cli.run_with_cache(config, params, b_ids, names=["blocks.1.*", "embed"])
    assert list(cache) == ["embed", *(f"blocks.1.{p}" for p in hooks._BLOCK_POINTS)]
    shapes = {name: a.shape for name, a in cache.items()}
    assert shapes["blocks.1.attn.q"] == (2, 16, 4, 8)  # [B, T, H, K]
    assert shapes["blocks.1.mlp.pre"] == (2, 16, 40)  # [B, T, I]
    _, everything = gpt2cli.run_with_cache(config, params, b_ids)
    assert list(everything) == list(hooks.names(3)) and len(everything) == 2 + 15 * 3 + 1


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("blocks.0.attn.hook_pattern", "blocks.0.attn.pattern"),
        ("blocks.7.resid_post", "blocks.1.resid_post"),
        ("ln_final.hook_normalized", "ln_final.normalized"),
    ],
)
def test_a_bad_name_is_one_line_naming_the_closest(tiny_b, b_ids, name, closest):
    config, params = tiny_b
    with pytest.raises(UserError) as caught:
        gpt2cli.run_with_cache(config, params, b_ids, names=[name])
    message = str(caught.value)
    assert "\n" not in message and f"{name!r} names no hook point" in message
    assert closest in message.split("closest: ")[1]
    with pytest.raises(UserError, match="^hooks: 'nothing' names no hook point"):
        gpt2cli.run_with_hooks(config, params, b_ids, hooks={"nothing": identity})


def test_hooks_must_be_hashable_functions(tiny_b, b_ids):
    config, params = tiny_b
    with pytest.raises(UserError, match=r"hooks\['embed'\] must be a function"):
        gpt2cli.run_with_hooks(config, params, b_ids, hooks={"embed": 3})

    class Unhashable:
        __hash__ = None

        def __call__(self, x, name):
            return x

    with pytest.raises(UserError, match="hooks must be hashable"):
        gpt2cli.run_with_hooks(config, params, b_ids, hooks={"embed": Unhashable()})


def test_identity_hooks_leave_logits_bit_identical(tiny_b, b_ids):
    config, params = tiny_b
    plain = gpt2cli.logits(config, params, b_ids)
    hooked = gpt2cli.run_with_hooks(config, params, b_ids, hooks={"*": identity})
    np.testing.assert_array_equal(hooked, plain)
    cached, _ = gpt2cli.run_with_cache(config, params, b_ids)
    np.testing.assert_array_equal(cached, plain)


def test_identity_hooks_at_bfloat16_too(tiny_b, b_ids):
    config, params = tiny_b
    plain = gpt2cli.logits(config, params, b_ids, dtype="bfloat16")
    hooked, cache = gpt2cli.run_with_cache(
        config, params, b_ids, names=["blocks.0.attn.z"], hooks={"*": identity}, dtype="bfloat16"
    )
    np.testing.assert_array_equal(hooked, plain)
    assert cache["blocks.0.attn.z"].dtype == jnp.bfloat16


def test_hooks_compose_in_the_order_given(tiny_b, b_ids):
    config, params = tiny_b
    ramp = jnp.linspace(0, 1, config.n_embd)  # not a constant: LayerNorm would remove that

    def double(x, name):
        return x * 2

    def shift(x, name):
        return x + ramp

    def both(x, name):
        return x * 2 + ramp

    def run(table):
        return gpt2cli.run_with_hooks(config, params, b_ids, hooks=table)

    glob_then_exact = run({"blocks.*.resid_mid": double, "blocks.1.resid_mid": shift})
    np.testing.assert_array_equal(
        glob_then_exact, run({"blocks.1.resid_mid": both, "blocks.[02].resid_mid": double})
    )
    listed = run({"blocks.1.resid_mid": [shift, double]})  # 2 x + 2 ramp
    assert not np.allclose(listed, run({"blocks.1.resid_mid": both}), atol=1e-3)


def test_a_plan_compiles_once(tiny_b, b_ids):
    config, params = tiny_b
    traces = []

    def counting(x, name):
        traces.append(name)  # runs only while the program is traced
        return x

    table = {"blocks.0.attn.z": counting}
    for reference in (b_ids, b_ids[::-1]):  # a new mean, the same shapes
        _, z = gpt2cli.run_with_cache(config, params, reference, names=["blocks.0.attn.z"])
        table["blocks.1.attn.z"] = lens.mean_head(1, 0, z["blocks.0.attn.z"])
        gpt2cli.run_with_cache(config, params, b_ids, names=["blocks.2.*"], hooks=table)
    assert traces == ["blocks.0.attn.z"]
    gpt2cli.run_with_cache(config, params, b_ids, names=["blocks.1.*"], hooks=table)
    assert traces == ["blocks.0.attn.z"] * 2  # other names: another program


def test_nothing_asked_traces_the_plain_program(tiny_b, b_ids):
    """Points outside a lens run (and inside one that asks for nothing) add nothing."""
    config, params = tiny_b
    model = GPT2(config)

    def program() -> str:  # a new function each time: JAX reuses a function's trace
        return str(jax.make_jaxpr(lambda p, ids: model.apply({"params": p}, ids)[0])(params, b_ids))

    plain = program()
    with hooks.recording():
        assert program() == plain
    with hooks.recording(hooks={"embed": [lambda x, name: x * 2]}):
        assert program() != plain


def test_patterns_are_not_points_of_a_cached_step(tiny_b, b_ids):
    config, params = tiny_b
    cache = KVCache.empty(config, 1, 8)
    with (
        hooks.recording(keep=["blocks.0.attn.pattern"]),
        pytest.raises(ValueError, match="not of a step over a KV cache"),
    ):
        GPT2(config).apply({"params": params}, b_ids[:1, :2], cache=cache)


# ---- patching and steering ---------------------------------------------------------------


def test_patching_every_position_reproduces_the_other_prompt(tiny_b, b_ids):
    config, params = tiny_b
    clean, corrupt = b_ids[:1], b_ids[1:]
    _, source = gpt2cli.run_with_cache(config, params, corrupt, names=["blocks.*.resid_pre"])
    want = gpt2cli.logits(config, params, corrupt)
    for layer in range(config.n_layer):
        name = f"blocks.{layer}.resid_pre"
        every = {name: lens.patch(source[name], positions=range(16))}
        np.testing.assert_allclose(
            gpt2cli.run_with_hooks(config, params, clean, hooks=every), want, atol=1e-5
        )
    whole = {"blocks.1.resid_pre": lens.patch(source["blocks.1.resid_pre"])}
    np.testing.assert_allclose(
        gpt2cli.run_with_hooks(config, params, clean, hooks=whole), want, atol=1e-5
    )


def test_patch_sweep_over_layers_and_positions(tiny_b, b_ids):
    config, params = tiny_b
    clean, corrupt = b_ids[:1, :6], b_ids[1:, :6]
    _, source = gpt2cli.run_with_cache(config, params, corrupt, names=["blocks.*.resid_pre"])
    sweep = lens.patch_sweep(config, params, clean, source)  # [L, T, B, V]
    assert sweep.shape == (3, 6, 1, 512)
    one = {"blocks.2.resid_pre": lens.patch(source["blocks.2.resid_pre"], [4])}
    np.testing.assert_allclose(
        sweep[2, 4], gpt2cli.run_with_hooks(config, params, clean, hooks=one)[:, -1], atol=1e-5
    )
    clean_last = np.asarray(gpt2cli.logits(config, params, clean)[:, -1])
    assert np.abs(sweep - clean_last).max() > 0.1
    _, itself = gpt2cli.run_with_cache(config, params, clean, names=["blocks.*.resid_pre"])
    same = lens.patch_sweep(config, params, clean, itself)  # patching in what was there
    np.testing.assert_array_equal(same, np.broadcast_to(clean_last, same.shape))
    with pytest.raises(UserError, match="source lacks blocks.0.mlp.out"):
        lens.patch_sweep(config, params, clean, source, point="mlp.out")


def test_patch_refuses_another_length(tiny_b, b_ids):
    config, params = tiny_b
    _, source = gpt2cli.run_with_cache(config, params, b_ids[:1, :5], names=["embed"])
    with pytest.raises(UserError, match=r"cannot patch embed shaped \(1, 16, 32\) .* same length"):
        gpt2cli.run_with_hooks(
            config, params, b_ids[:1], hooks={"embed": lens.patch(source["embed"])}
        )
    with pytest.raises(UserError, match="position 5 is outside the source's 5 positions"):
        lens.patch(source["embed"], [5])


def test_steering_adds_the_scaled_vector(tiny_b, b_ids):
    config, params = tiny_b
    name = "blocks.1.resid_pre"
    vector = np.linspace(-1, 1, 32, dtype=np.float32)
    _, plain = gpt2cli.run_with_cache(config, params, b_ids, names=[name])
    hook = lens.add_vector(vector, 3.0, n_embd=config.n_embd)
    _, steered = gpt2cli.run_with_cache(config, params, b_ids, names=[name], hooks={name: hook})
    np.testing.assert_allclose(
        steered[name] - plain[name], np.broadcast_to(3 * vector, (2, 16, 32)), atol=1e-5
    )


def test_direction_is_the_mean_difference_and_round_trips(tiny_b, b_ids, tmp_path):
    config, params = tiny_b
    a, b = b_ids[:1], b_ids[1:, :9]  # prompts of different lengths
    vector = lens.direction(config, params, a, b, layer=2)
    _, ca = gpt2cli.run_with_cache(config, params, a, names=["blocks.2.resid_pre"])
    _, cb = gpt2cli.run_with_cache(config, params, b, names=["blocks.2.resid_pre"])
    want = np.mean(ca["blocks.2.resid_pre"][0], 0) - np.mean(cb["blocks.2.resid_pre"][0], 0)
    np.testing.assert_allclose(vector, want, atol=1e-6)
    np.testing.assert_array_equal(lens.direction(config, params, a, a, layer=0), 0)
    path = lens.save_vector(tmp_path / "v.npy", vector)
    np.testing.assert_array_equal(lens.load_vector(path, config.n_embd), vector)
    with pytest.raises(UserError, match="exists: pass force=True"):
        lens.save_vector(path, vector)
    with pytest.raises(UserError, match=r"layer must lie in \[0, 3\), got 3"):
        lens.direction(config, params, a, b, layer=3)


def test_a_steering_vector_of_the_wrong_width_is_refused_in_one_line(tiny_a, tiny_b, tmp_path):
    config_a, _ = tiny_a
    path = lens.save_vector(tmp_path / "wide.npy", np.ones(32, np.float32))  # tiny-b's width
    with pytest.raises(UserError) as caught:
        lens.load_vector(path, config_a.n_embd)
    assert str(caught.value) == (
        f"steering vector {path} has width 32, but this model's residual stream has 16: make it "
        "with the same model"
    )
    with pytest.raises(UserError, match="has width 5"):
        lens.add_vector(np.ones(5), n_embd=16)
    np.save(tmp_path / "matrix.npy", np.ones((2, 16), np.float32))
    with pytest.raises(
        UserError, match=r"must be a float vector \[n_embd\], got float32 \(2, 16\)"
    ):
        lens.load_vector(tmp_path / "matrix.npy", 16)
