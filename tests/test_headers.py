"""One reader for our files' JSON headers: each kind of file refuses a foreign format and a
version this gpt2 does not read, in one line that names the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt2cli.checkpoint import HEADER_KEY, load_npz, save_npz
from gpt2cli.errors import UserError
from gpt2cli.headers import check_header, read_json
from gpt2cli.training import prepare
from gpt2cli.training.run_folder import RUN_FILE, RunFolder, load_checkpoint
from gpt2cli.training.shards import open_prepared
from gpt2cli.weights import load_hf_folder
from tests.conftest import TINY_B


def _refused(read, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        read()
    assert "\n" not in str(info.value)


def test_the_header_is_returned_when_format_and_version_match():
    header = {"format": "x", "version": 3, "step": 7}
    assert check_header(header, "f", format="x", version=3, what="an x") is header


@pytest.mark.parametrize("header", [{"format": "y", "version": 1}, {"version": 1}, [1], "x"])
def test_another_format_or_no_object_is_refused(header):
    _refused(
        lambda: check_header(header, "f.json", format="x", version=1, what="an x file"),
        r"^f.json is not an x file \(its header format is not 'x'\)$",
    )


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_any_other_version_is_refused_with_the_fix(version):
    _refused(
        lambda: check_header(
            {"format": "x", "version": version},
            "f.json",
            format="x",
            version=1,
            what="an x",
            fix=": make it again",
        ),
        rf"^f.json is version {version!r} of 'x'; this gpt2 reads version 1: make it again$",
    )


def test_unreadable_json_names_the_file(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    _refused(lambda: read_json(tmp_path / "a.json"), r"^cannot read .*a.json: ")
    _refused(lambda: read_json(tmp_path / "none.json"), r"^cannot read .*none.json: ")


def _edit_npz_header(path, key: str, **changes) -> None:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    header = {**json.loads(str(arrays[key])), **changes}
    arrays[key] = np.array(json.dumps(header))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _edit_json(path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def model():
    return load_hf_folder(TINY_B)


def test_a_model_checkpoint_of_a_newer_version_or_another_format(tmp_path, model):
    path = save_npz(tmp_path / "m.npz", *model)
    _edit_npz_header(path, HEADER_KEY, version=2)
    _refused(
        lambda: load_npz(path), "m.npz is version 2 of 'gpt2cli-npz'; this gpt2 reads version 1"
    )
    _edit_npz_header(path, HEADER_KEY, format="gpt2cli-train-ckpt", version=1)
    _refused(lambda: load_npz(path), "m.npz is not a gpt2 checkpoint")


def test_a_training_checkpoint_of_a_newer_version_or_another_format(tmp_path, model):
    config, params = model
    path = RunFolder(tmp_path).save(5, config, params, {}, keep=1)
    assert load_checkpoint(path, params, {})[0] == 5  # the unedited file reads
    _edit_npz_header(path, "__train__", version=2)
    _refused(lambda: load_checkpoint(path, params, {}), "is version 2 of 'gpt2cli-train-ckpt'")
    _edit_npz_header(path, "__train__", format="gpt2cli-npz", version=1)
    _refused(lambda: load_checkpoint(path, params, {}), "is not a training checkpoint")


def test_a_run_file_of_a_newer_version_or_another_format(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_spec({"steps": 3})
    assert folder.spec()["steps"] == 3
    _edit_json(tmp_path / RUN_FILE, version=3)
    _refused(folder.spec, "run.json is version 3 of 'gpt2cli-run'; this gpt2 reads version 2")
    _edit_json(tmp_path / RUN_FILE, format="gpt2cli-tokens", version=1)
    _refused(folder.spec, "run.json is not a gpt2 training run file")


def test_a_prepared_index_of_a_newer_version_or_another_format(tmp_path):
    index = tmp_path / prepare.INDEX
    index.write_text(json.dumps({"format": prepare.FORMAT, "version": 2, "shards": []}))
    _refused(
        lambda: open_prepared(tmp_path),
        r"index.json is version 2 of 'gpt2cli-tokens'; .* 1: prepare the dataset again$",
    )
    _edit_json(index, format="gpt2cli-run", version=1)
    _refused(lambda: open_prepared(tmp_path), "index.json is not an index written by gpt2 prepare")
