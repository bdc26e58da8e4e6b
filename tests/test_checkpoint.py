"""The .npz format: exact paths, atomic writes, no pickles, validation that names the problem."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from gpt2cli.checkpoint import HEADER_KEY, flatten, load_npz, save_npz
from gpt2cli.errors import UserError
from gpt2cli.weights import load_hf_folder
from tests.conftest import TINY_B


@pytest.fixture(scope="module")
def model():
    return load_hf_folder(TINY_B)


def _arrays(path):
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def test_saved_at_exactly_the_given_path(tmp_path, model):
    written = save_npz(tmp_path / "weights", *model)
    assert written == tmp_path / "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]  # no .npz added, no temp left
    config, params = load_npz(written)
    assert config == model[0]
    for name, array in flatten(model[1]).items():
        np.testing.assert_array_equal(flatten(params)[name], array)


def test_header_has_format_version_and_config_as_json(tmp_path, model):
    save_npz(tmp_path / "m.npz", *model)
    header = json.loads(str(_arrays(tmp_path / "m.npz")[HEADER_KEY]))
    assert header["format"] == "gpt2cli-npz" and header["version"] == 1
    assert header["config"]["n_inner"] == 40


def test_existing_file_is_not_overwritten_without_force(tmp_path, model):
    target = tmp_path / "m.npz"
    target.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists"):
        save_npz(target, *model)
    assert target.read_bytes() == b"precious"
    save_npz(target, *model, force=True)
    assert load_npz(target)[0] == model[0]


def test_bfloat16_survives_the_round_trip(tmp_path, model):
    config, params = model
    flat = {k: v.astype(ml_dtypes.bfloat16) for k, v in flatten(params).items()}
    from gpt2cli.checkpoint import unflatten

    save_npz(tmp_path / "b.npz", config, unflatten(flat))
    loaded = flatten(load_npz(tmp_path / "b.npz")[1])
    assert loaded["wte/embedding"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert loaded["wte/embedding"].tobytes() == flat["wte/embedding"].tobytes()


def test_unwritable_folder_is_one_clear_error(tmp_path, model):
    if os.geteuid() == 0:
        target = tmp_path / "no-such-folder" / "m.npz"
        with pytest.raises(UserError, match="does not exist"):
            save_npz(target, *model)
    else:
        tmp_path.chmod(0o500)
        with pytest.raises(UserError, match="cannot write"):
            save_npz(tmp_path / "m.npz", *model)


def test_npz_that_is_not_ours(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(UserError, match="not a gpt2 checkpoint"):
        load_npz(tmp_path / "other.npz")


def test_pickled_object_array_is_never_loaded(tmp_path, model):
    save_npz(tmp_path / "m.npz", *model)
    arrays = _arrays(tmp_path / "m.npz")
    arrays["wte/embedding"] = np.array([{"evil": 1}], dtype=object)
    np.savez(tmp_path / "evil.npz", **arrays)
    with pytest.raises(UserError, match="pickled objects"):
        load_npz(tmp_path / "evil.npz")


def test_wrong_shaped_and_missing_arrays_are_named(tmp_path, model):
    save_npz(tmp_path / "m.npz", *model)
    arrays = _arrays(tmp_path / "m.npz")
    np.savez(tmp_path / "short.npz", **{k: v for k, v in arrays.items() if k != "h_1/ln_2/bias"})
    with pytest.raises(UserError, match=r"missing 1 array\(s\): h_1/ln_2/bias"):
        load_npz(tmp_path / "short.npz")
    np.savez(tmp_path / "bent.npz", **{**arrays, "wpe/embedding": np.zeros((2, 2), np.float32)})
    with pytest.raises(UserError, match=r"wpe/embedding \(2, 2\) \(expected \(64, 32\)\)"):
        load_npz(tmp_path / "bent.npz")


def test_garbage_file_is_not_an_npz(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_npz(tmp_path / "junk.npz")
