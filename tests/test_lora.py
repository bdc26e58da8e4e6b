"""LoRA adapters: PEFT's folder format both ways, the merge, and the adapter inside the model,
against golden logits of `peft.PeftModel` (scripts/make_lora_fixtures.py)."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import gpt2cli
from gpt2cli import adapter, lora
from gpt2cli.checkpoint import flatten
from gpt2cli.config import preset
from gpt2cli.errors import UserError
from tests.conftest import FIXTURES

LORA_A = FIXTURES / "lora-a"
PEFT_FOLDER = LORA_A / "adapter"


@pytest.fixture(scope="module")
def lora_golden() -> dict:
    meta = json.loads((LORA_A / "golden.json").read_text())
    with np.load(LORA_A / "golden.npz", allow_pickle=False) as data:
        meta.update({name: data[name] for name in data.files})
    return meta


def test_peft_adapter_gives_peft_logits(tiny_a, lora_golden):
    config, params = tiny_a
    merged = adapter.apply_adapter(config, params, PEFT_FOLDER)
    ours = np.asarray(gpt2cli.logits(config, merged, lora_golden["input_ids"]))
    columns = lora_golden["logits"].shape[-1]
    np.testing.assert_allclose(ours[..., :columns], lora_golden["logits"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ours.argmax(-1), lora_golden["argmax"])
    base = np.asarray(gpt2cli.logits(config, params, lora_golden["input_ids"]))
    assert np.abs(base - ours).max() > 0.5  # the adapter matters at this tolerance


def test_adapter_read_as_peft_wrote_it(tiny_a):
    spec, adapters = adapter.load_adapter(PEFT_FOLDER)
    assert (spec.rank, spec.alpha, spec.scale) == (4, 8.0, 2.0)
    assert spec.targets == adapter.targets_of(adapters) == lora.TARGETS
    peft = load_file(PEFT_FOLDER / adapter.WEIGHTS_FILE)
    a = adapters["h_1"]["mlp"]["c_proj"]["lora_a"]  # [in, r] = PEFT's lora_A.T
    np.testing.assert_array_equal(
        a, peft["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"].T
    )
    assert a.shape == (64, 4)


def test_saved_adapter_is_what_peft_writes(tmp_path):
    spec, adapters = adapter.load_adapter(PEFT_FOLDER)
    out = adapter.save_adapter(tmp_path / "ours", spec, adapters, base="tiny-a")
    theirs = load_file(PEFT_FOLDER / adapter.WEIGHTS_FILE)
    ours = load_file(out / adapter.WEIGHTS_FILE)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape
        np.testing.assert_array_equal(ours[key], value)
    peft_config = json.loads((PEFT_FOLDER / adapter.CONFIG_FILE).read_text())
    our_config = json.loads((out / adapter.CONFIG_FILE).read_text())
    for key, value in our_config.items():
        if key == "target_modules":
            assert sorted(value) == sorted(peft_config[key])
        else:
            assert value == peft_config[key], key
    again_spec, again = adapter.load_adapter(out)  # and it reads back the same
    assert again_spec == spec
    for name, value in flatten(adapters).items():
        np.testing.assert_array_equal(flatten(again)[name], value)


def test_merge_is_base_plus_scaled_product(tiny_a):
    config, params = tiny_a
    spec = lora.LoraSpec(rank=3, alpha=6.0, targets=("attn.c_attn", "mlp.c_fc"))
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(
        lambda a: rng.normal(size=a.shape).astype(np.float32), lora.init_adapters(config, spec)
    )
    merged = lora.merge(params, adapters, spec.scale)
    for name, value in flatten(params).items():
        if name.endswith("c_attn/kernel") or name.endswith("c_fc/kernel"):
            at = adapters[name.split("/")[0]][name.split("/")[1]][name.split("/")[2]]
            expected = value + 2.0 * (at["lora_a"] @ at["lora_b"])
            np.testing.assert_allclose(flatten(merged)[name], expected, rtol=1e-6, atol=1e-6)
        else:
            assert flatten(merged)[name] is value  # untouched arrays are not even copied


def test_attached_adapter_runs_as_the_merged_kernel(tiny_a):
    """Training's path (x @ W + x @ A @ sB inside the model) equals inference's merge."""
    from gpt2cli.model import GPT2

    config, params = tiny_a
    spec = lora.LoraSpec(rank=2, alpha=5.0, targets=lora.TARGETS)
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(
        lambda a: 0.3 * rng.normal(size=a.shape).astype(np.float32),
        lora.init_adapters(config, spec),
    )
    ids = np.asarray([[464, 2068, 7586, 21831]])
    attached, _ = GPT2(config).apply({"params": lora.attach(params, adapters, spec.scale)}, ids)
    merged = gpt2cli.logits(config, lora.merge(params, adapters, spec.scale), ids)
    base = gpt2cli.logits(config, params, ids)
    np.testing.assert_allclose(np.asarray(attached), np.asarray(merged), atol=2e-5, rtol=0)
    assert np.abs(np.asarray(base) - np.asarray(merged)).max() > 0.1


def test_fresh_adapters_change_nothing_and_follow_peft_init():
    config = preset("tiny")
    spec = lora.LoraSpec(rank=8, alpha=8.0, targets=("attn.c_attn", "mlp.c_proj"))
    adapters = flatten(lora.init_adapters(config, spec, seed=3))
    assert set(adapters) == set(lora.adapter_shapes(config, spec))
    a, b = adapters["h_0/mlp/c_proj/lora_a"], adapters["h_0/mlp/c_proj/lora_b"]
    assert a.shape == (config.mlp_width, 8) and b.shape == (8, config.n_embd)
    assert not b.any() and 0 < np.abs(a).max() <= 1 / np.sqrt(config.mlp_width)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["c_attn"], ("attn.c_attn",)),
        (["c_proj"], ("attn.c_proj", "mlp.c_proj")),
        (["mlp.c_proj,c_fc"], ("mlp.c_fc", "mlp.c_proj")),
    ],
)
def test_targets_by_peft_or_full_name(given, expected):
    assert lora.parse_targets(given) == expected


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: lora.parse_targets(["q_proj"]), "'q_proj' names no layer"),
        (lambda: lora.parse_targets([]), "names no layer"),
        (lambda: lora.LoraSpec(0, 8.0), "lora_rank must be a positive integer, got 0"),
        (lambda: lora.LoraSpec(4, 8.0, dropout=1.0), "lora_dropout must be in [0, 1)"),
        (lambda: lora.LoraSpec(65, 8.0).check_fits(preset("tiny")), "lora_rank 65 is wider than"),
    ],
)
def test_wrong_settings_are_one_line(make, message):
    with pytest.raises(UserError, match=None) as caught:
        make()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_adapter_for_another_shape_is_refused(tiny_b):
    config, params = tiny_b  # 32 wide, 3 layers: the adapter was made on tiny-a (16 wide)
    with pytest.raises(UserError, match="was made for another model shape: h_0/attn/c_attn"):
        adapter.apply_adapter(config, params, PEFT_FOLDER)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "use_dora=True, which gpt2 does not apply"),
        ({"peft_type": "IA3"}, "is a IA3 adapter"),
        ({"r": 0}, "lora_rank must be a positive integer"),
    ],
)
def test_unsupported_peft_configs_are_refused(tmp_path, change, message):
    folder = tmp_path / "a"
    shutil.copytree(PEFT_FOLDER, folder)
    config = json.loads((folder / adapter.CONFIG_FILE).read_text())
    (folder / adapter.CONFIG_FILE).write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        adapter.load_adapter(folder)


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(UserError, match="is not a LoRA adapter folder"):
        adapter.load_adapter(tmp_path)
