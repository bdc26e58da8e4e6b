"""Any GPT-2 shape from flags or a config.json; the shape travels with the run and its files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from gpt2cli.checkpoint import load_npz
from gpt2cli.config import GPT2Config, new_model_config, preset
from gpt2cli.errors import UserError
from gpt2cli.training.settings import scratch_lr
from tests.conftest import cli as gpt2_in_process
from tests.helpers_train import assert_opens_in_transformers, isolate, write_corpus

SHAPE = ("--init", "tiny", "--n-layer", "3", "--n-head", "2", "--n-embd", "32")
SMALL = ("--steps", "2", "--batch-size", "2", "--seq-length", "16", "--n-positions", "48")


gpt2 = gpt2_in_process


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def shaped_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shape")
    corpus = write_corpus(folder / "corpus.txt")
    done = gpt2("train", "-d", str(corpus), *SHAPE, *SMALL, "--out", str(folder / "run"))
    assert done.exit_code == 0, done.output
    assert "3 layers, 2 heads, width 32, context 48" in done.output
    assert "compiled the training step in" in done.output
    assert re.search(r"(^|\n)memory: 0\.", done.output), done.output
    return folder / "run"


def test_the_shape_lands_in_run_json_checkpoint_and_final_file(shaped_run, tmp_path):
    spec = json.loads((shaped_run / "run.json").read_text())
    want = {"n_layer": 3, "n_head": 2, "n_embd": 32, "n_positions": 48}
    assert {k: spec["model_config"][k] for k in want} == want
    assert spec["settings"]["lr"] == 1e-2  # the size rule's cap (6e-4 * 768 / 32 is above it)
    config, params = load_npz(shaped_run / "final.npz")
    assert (config.n_layer, config.n_embd) == (3, 32)
    assert params["wpe"]["embedding"].shape == (48, 32) and "h_2" in params
    with np.load(next(shaped_run.glob("ckpt-*.npz")), allow_pickle=False) as ckpt:
        assert json.loads(str(ckpt["__train__"]))["config"]["n_layer"] == 3
    shown = gpt2("inspect", str(shaped_run / "final.npz"), "--json")
    assert json.loads(shown.stdout)["config"]["n_head"] == 2, shown.output
    converted = gpt2("convert", str(shaped_run / "final.npz"), str(tmp_path / "hf"), "--to", "hf")
    assert converted.exit_code == 0, converted.output
    assert json.loads((tmp_path / "hf/config.json").read_text())["n_embd"] == 32
    assert_opens_in_transformers(tmp_path / "hf", context=48)  # a run's model exports whole


def test_init_from_a_config_json(tmp_path):
    config = preset("tiny").replace(n_layer=1, n_embd=48, n_head=3)
    (tmp_path / "shape").mkdir()
    (tmp_path / "shape/config.json").write_text(json.dumps(config.to_hf()))
    assert new_model_config(str(tmp_path / "shape/config.json")) == config
    assert new_model_config(str(tmp_path / "shape"), n_layer=2) == config.replace(n_layer=2)
    with pytest.raises(UserError, match="no such config file"):
        new_model_config("nowhere/config.json")


def test_learning_rate_rule_by_width():
    assert scratch_lr(GPT2Config()) == pytest.approx(6e-4)
    assert scratch_lr(preset("tiny")) == pytest.approx(7.2e-3)
    assert scratch_lr(preset("gpt2-xl")) == pytest.approx(6e-4 * 768 / 1600)
    assert scratch_lr(preset("tiny").replace(n_embd=16, n_head=2)) == 1e-2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init", "tiny", "--n-embd", "130"], "n_embd must be divisible by n_head"),
        (["--n-layer", "4"], "--n-layer shapes a new model: add --init"),
        (["--init", "my/config.json"], "no such config file"),
    ],
)
def test_bad_shapes_are_one_line(tmp_path, args, message):
    corpus = write_corpus(tmp_path / "c.txt", lines=20)
    done = gpt2("train", "-d", str(corpus), "--steps", "1", *args)
    assert done.exit_code == 1
    assert message in done.output and len(done.output.strip().splitlines()) == 1, done.output


def test_a_config_json_with_fewer_tokens_than_its_tokenizer_is_refused(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", lines=20)
    shape = {"model_type": "gpt2", "vocab_size": 1000, "n_positions": 32, "n_embd": 16,
             "n_layer": 1, "n_head": 2}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(shape))
    done = gpt2("train", "-d", str(corpus), "--init", "config.json", "--steps", "1", "--out", "r")
    assert done.exit_code == 1
    assert done.output.strip() == (
        "error: config.json: vocab_size 1000 is below the tokenizer's 50257 tokens; give a "
        "vocab_size of at least 50257"
    )
    assert not (tmp_path / "r").exists()
