"""HF safetensors <-> params, against files written by transformers and by the old Hub layout."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt2cli.checkpoint import load_npz, save_npz
from gpt2cli.config import GPT2Config
from gpt2cli.errors import UserError
from gpt2cli.weights import load_hf_folder, params_from_hf, save_hf_folder
from tests.conftest import TINY_A, TINY_B


def test_round_trip_hf_npz_hf_is_bit_exact(tmp_path):
    config, params = load_hf_folder(TINY_A)
    save_npz(tmp_path / "m.npz", config, params)
    config2, params2 = load_npz(tmp_path / "m.npz")
    save_hf_folder(tmp_path / "hf", config2, params2)
    original = load_file(TINY_A / "model.safetensors")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, array in original.items():
        assert exported[name].dtype == array.dtype
        assert exported[name].tobytes() == array.tobytes(), name
    assert GPT2Config.from_json_file(tmp_path / "hf" / "config.json") == config


def test_old_hub_layout_drops_buffers_and_keeps_every_weight():
    config, params = load_hf_folder(TINY_B)
    raw = load_file(TINY_B / "model.safetensors")
    assert "h.0.attn.bias" in raw and "wte.weight" in raw  # really the old layout
    np.testing.assert_array_equal(
        params["h_0"]["attn"]["c_attn"]["bias"], raw["h.0.attn.c_attn.bias"]
    )
    np.testing.assert_array_equal(
        params["h_2"]["mlp"]["c_fc"]["kernel"], raw["h.2.mlp.c_fc.weight"]
    )
    np.testing.assert_array_equal(params["ln_f"]["scale"], raw["ln_f.weight"])


def _tiny_b_tensors():
    config = GPT2Config.from_json_file(TINY_B / "config.json")
    return config, load_file(TINY_B / "model.safetensors")


def test_tied_lm_head_is_accepted_only_when_equal_to_wte():
    config, tensors = _tiny_b_tensors()
    params_from_hf({**tensors, "lm_head.weight": tensors["wte.weight"].copy()}, config)
    with pytest.raises(UserError, match="lm_head.weight differs"):
        params_from_hf({**tensors, "lm_head.weight": tensors["wte.weight"] + 1}, config)


def test_missing_unexpected_and_misshapen_tensors_are_named():
    config, tensors = _tiny_b_tensors()
    with pytest.raises(UserError, match=r"missing 1 tensor\(s\): h.1.mlp.c_fc.bias"):
        params_from_hf({k: v for k, v in tensors.items() if k != "h.1.mlp.c_fc.bias"}, config)
    with pytest.raises(UserError, match=r"1 unexpected tensor\(s\): h.0.extra"):
        params_from_hf({**tensors, "h.0.extra": np.zeros(1)}, config)
    bad = {**tensors, "wpe.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(UserError, match=r"wpe.weight \(3, 3\) \(expected \(64, 32\)\)"):
        params_from_hf(bad, config)


def test_sharded_checkpoint_is_read(tmp_path):
    tensors = load_file(TINY_A / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:10],
        "model-00002-of-00002.safetensors": names[10:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(TINY_A / "config.json", tmp_path)
    _, params = load_hf_folder(tmp_path)
    _, reference = load_hf_folder(TINY_A)
    np.testing.assert_array_equal(params["wte"]["embedding"], reference["wte"]["embedding"])


def test_pickle_only_folder_is_refused_with_the_reason(tmp_path):
    shutil.copy(TINY_A / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(UserError, match="safetensors only, because pickle files can run code"):
        load_hf_folder(tmp_path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated download
        lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n",
    ],
    ids=["truncated", "lfs-pointer"],
)
def test_damaged_safetensors_says_corrupt_download(tmp_path, damage):
    shutil.copy(TINY_B / "config.json", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(
        damage((TINY_B / "model.safetensors").read_bytes())
    )
    with pytest.raises(UserError, match="corrupt or incomplete download"):
        load_hf_folder(tmp_path)


def test_folder_without_config_is_refused(tmp_path):
    shutil.copy(TINY_B / "model.safetensors", tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        load_hf_folder(tmp_path)
