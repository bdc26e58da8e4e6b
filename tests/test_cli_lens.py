"""`gpt2 lens` on tiny-a (real GPT-2 vocabulary): the table, JSON, the attention PNG, steering
directions, and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gpt2cli
from gpt2cli import lens
from gpt2cli.tokenizer import bundled
from tests.conftest import TINY_A, TINY_B, cli

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def expected(tiny_a):
    """The prompt's ids and the model's own top token at each position."""
    config, params = tiny_a
    ids = bundled().encode(PROMPT)
    logits = np.asarray(gpt2cli.logits(config, params, ids))[0]  # [T, V]
    return ids, logits.argmax(-1)


def test_the_table_shows_each_layer_at_the_last_position(expected):
    ids, top = expected
    done = cli("lens", PROMPT, "-m", str(TINY_A), "--top-k", "3")
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert "logit lens at position 4 (' is'): top 3" in lines[0]
    rows = [line for line in lines if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["embed", "0", "1"]
    model_top = bundled().decode([int(top[-1])])
    assert rows[-1].split("│")[2].strip().startswith(repr(model_top))
    first = cli("lens", PROMPT, "-m", str(TINY_A), "--position", "0")
    assert "logit lens at position 0 ('The'): top 5" in first.stdout


def test_json_has_every_layer_and_position(expected):
    ids, top = expected
    done = cli("lens", PROMPT, "-m", str(TINY_A), "--json", "--top-k", "4")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["tokens"] == [bundled().decode([i]) for i in ids]
    assert [layer["layer"] for layer in report["layers"]] == ["embed", 0, 1]
    assert report["layers"][0]["stream"] == "blocks.0.resid_pre"
    last = report["layers"][-1]
    assert last["stream"] == "blocks.1.resid_post"
    assert [p["top"][0]["id"] for p in last["positions"]] == top.tolist()
    for layer in report["layers"]:
        assert len(layer["positions"]) == len(ids)
        for position in layer["positions"]:
            probs = [entry["prob"] for entry in position["top"]]
            assert len(probs) == 4 and probs == sorted(probs, reverse=True)


def test_attention_as_json_and_png(tiny_a, expected, tmp_path):
    ids, _ = expected
    config, params = tiny_a
    done = cli("lens", PROMPT, "-m", str(TINY_A), "--attention", "1.1", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    want = lens.attention_pattern(config, params, [ids], 1, 1)
    np.testing.assert_allclose(report["pattern"], want, rtol=1e-6)
    np.testing.assert_allclose(np.sum(report["pattern"], axis=1), 1, rtol=1e-5)
    png = tmp_path / "attn.png"
    done = cli("lens", PROMPT, "-m", str(TINY_A), "--attention", "1.1", "--png", str(png))
    assert done.exit_code == 0, done.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = cli("lens", PROMPT, "-m", str(TINY_A), "--attention", "1.1", "--png", str(png))
    assert again.exit_code == 1 and "exists: pass --force" in again.output
    table = cli("lens", PROMPT, "-m", str(TINY_A), "--attention", "0.1")
    assert "attention pattern of layer 0, head 1" in table.stdout


def test_save_direction_writes_the_mean_difference(tiny_a, tmp_path):
    config, params = tiny_a
    out = tmp_path / "love_hate.npy"
    args = ("lens", "-m", str(TINY_A), "--save-direction", "Love", "Hate", str(out), "--layer", "1")
    done = cli(*args)
    assert done.exit_code == 0, done.output
    tok = bundled()
    want = lens.direction(config, params, [tok.encode("Love")], [tok.encode("Hate")], 1)
    np.testing.assert_allclose(lens.load_vector(out, config.n_embd), want, rtol=1e-6)
    assert cli(*args).exit_code == 1
    assert cli(*args, "--force").exit_code == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--png", "x.png"], 2, "--png: draws --attention LAYER.HEAD"),
        (["--layer", "1"], 2, "--layer: is for --save-direction"),
        (["--attention", "nine"], 2, "'nine' is not LAYER.HEAD"),
        (["--attention", "2.0"], 1, "--attention's layer 2 is outside this model's 0..1"),
        (["--attention", "0.2"], 1, "--attention's head 2 is outside this model's 0..1"),
        (["--position", "5"], 1, "--position 5 is outside the prompt's 5 tokens"),
        (["--top-k", "0"], 2, "--top-k"),
        (["--save-direction", "a", "b", "v.npy"], 2, "takes its two prompts, not PROMPT"),
    ],
)
def test_wrong_input_is_one_line(args, code, message):
    done = cli("lens", PROMPT, "-m", str(TINY_A), *args)
    assert done.exit_code == code, done.output
    errors = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.output
    assert "Traceback" not in done.output


def test_no_prompt_and_no_matplotlib(monkeypatch):
    done = cli("lens", "-m", str(TINY_A))
    assert done.exit_code == 2 and "no prompt" in done.output
    done = cli("lens", "-m", str(TINY_A), "--save-direction", "a", "b", "v.npy")
    assert done.exit_code == 2 and "needs --layer N" in done.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    done = cli("lens", PROMPT, "-m", str(TINY_A), "--attention", "0.0", "--png", "a.png")
    assert done.exit_code == 1
    assert "error: --png needs matplotlib, in the plot extra" in done.output


def test_a_prompt_outside_the_models_vocabulary():
    done = cli("lens", PROMPT, "-m", str(TINY_B))  # 512 ids, no tokenizer of its own
    assert done.exit_code == 1
    assert "but the model's vocabulary has 512 ids" in done.output
    assert "pass the model's tokenizer with --tokenizer" in done.output


def test_help_has_examples():
    done = cli("lens", "--help")
    assert done.exit_code == 0
    assert 'gpt2 lens "The Eiffel Tower is in the city of" -m gpt2' in done.stdout
    assert "--save-direction" in done.stdout
