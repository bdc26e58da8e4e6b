"""`--adapter DIR` on the inference commands, `convert --adapter` and `inspect` of an adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt2cli import adapter, lora
from gpt2cli.checkpoint import flatten, load_npz
from tests.conftest import FIXTURES, TINY_A, TINY_B, cli

PEFT_FOLDER = FIXTURES / "lora-a" / "adapter"


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "eval", "bench", "convert"])
def test_every_inference_command_takes_an_adapter(command):
    done = cli(command, "--help", env={"COLUMNS": "200"})
    assert done.exit_code == 0 and "--adapter" in done.output


def test_convert_merges_and_generate_applies_the_same_weights(tmp_path, tiny_a):
    config, params = tiny_a
    merged_file = tmp_path / "merged.npz"
    done = cli("convert", str(TINY_A), str(merged_file), "--adapter", str(PEFT_FOLDER))
    assert done.exit_code == 0, done.output
    _, merged = load_npz(merged_file)
    spec, adapters = adapter.load_adapter(PEFT_FOLDER)
    expected = flatten(lora.merge(params, adapters, spec.scale))
    for name, value in flatten(merged).items():
        np.testing.assert_array_equal(value, expected[name])
    kernel = "h_1/mlp/c_fc/kernel"
    assert not np.array_equal(flatten(merged)[kernel], flatten(params)[kernel])

    prompt = ["generate", "The quick brown fox", "-n", "8", "--json"]
    with_adapter = cli(*prompt, "-m", str(TINY_A), "--adapter", str(PEFT_FOLDER))
    fused = cli(*prompt, "-m", str(merged_file))
    plain = cli(*prompt, "-m", str(TINY_A))
    texts = [json.loads(r.stdout)["token_ids"] for r in (with_adapter, fused, plain)]
    assert texts[0] == texts[1] != texts[2]


def test_inspect_shows_an_adapter(tmp_path):
    done = cli("inspect", str(PEFT_FOLDER), "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["config"]["rank"] == 4 and report["config"]["scale"] == 2.0
    assert report["config"]["targets"] == list(lora.TARGETS)
    assert report["total_params"] == 2 * (
        16 * 4 + 4 * 48 + 16 * 4 + 4 * 16 + 16 * 4 + 4 * 64 + 64 * 4 + 4 * 16
    )
    assert report["size_bytes"] == sum(f.stat().st_size for f in PEFT_FOLDER.iterdir())


@pytest.mark.parametrize("command", ["generate", "convert"])
def test_an_adapter_for_another_shape_is_one_line_and_writes_nothing(tmp_path, command):
    args = {
        "generate": ["generate", "hello", "-m", str(TINY_B)],
        "convert": ["convert", str(TINY_B), str(tmp_path / "out.npz")],
    }[command]
    done = cli(*args, "--adapter", str(PEFT_FOLDER))
    assert done.exit_code == 1
    assert len(done.output.strip().splitlines()) == 1, done.output
    assert "was made for another model shape" in done.output
    assert not (tmp_path / "out.npz").exists() and done.stdout == ""


def test_a_folder_that_is_not_an_adapter_is_one_line(tmp_path):
    done = cli("generate", "hello", "-m", str(TINY_A), "--adapter", str(tmp_path))
    assert done.exit_code == 1
    assert f"{tmp_path} is not a LoRA adapter folder" in done.output
    assert len(done.output.strip().splitlines()) == 1
