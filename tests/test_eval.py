"""`gpt2 eval` against the Hugging Face perplexity-guide numbers in the golden fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt2cli.errors import UserError
from gpt2cli.training.evaluate import evaluate, windows
from tests.conftest import cli
from tests.helpers_train import FIXTURES, TINY_A


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
    monkeypatch.setenv("GPT2_NO_COMPILE_CACHE", "1")


@pytest.fixture(scope="module")
def golden_ppl():
    meta = json.loads((FIXTURES / "golden.json").read_text())
    return meta["models"]["tiny_a"]["perplexity"]


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory, golden_ppl):
    path = tmp_path_factory.mktemp("eval") / "river.txt"
    path.write_text(golden_ppl["text"], encoding="utf-8")  # no trailing newline, as HF saw it
    return path


def test_windows_follow_the_hf_guide():
    wins = windows(199, 32, 16)
    assert (wins[0].begin, wins[0].end, wins[0].first_scored) == (0, 32, 1)
    assert (wins[1].begin, wins[1].end, wins[1].first_scored) == (16, 48, 32)
    assert wins[-1].end == 199 and wins[-1].begin == 176
    assert sum(w.end - w.first_scored for w in wins) == 198
    assert sum(w.end - w.first_scored for w in windows(199, 32, 32)) == 192


@pytest.mark.parametrize("stride", [32, 16])
def test_perplexity_equals_hf(stride, golden_ppl, eval_file):
    done = cli(
        *[
            "eval",
            "-m",
            str(TINY_A),
            "--dataset",
            str(eval_file),
            "--seq-length",
            "32",
            "--stride",
            str(stride),
            "--batch-size",
            "3",
            "--json",
        ],
    )
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    want = golden_ppl["strides"][str(stride)]
    assert result["tokens_scored"] == want["n_tokens"]
    assert result["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)
    assert result["loss"] == pytest.approx(want["mean_nll"], rel=1e-5)


def test_batching_does_not_change_the_sum(tiny_a_model, golden_ppl):
    from gpt2cli.tokenizer import bundled

    config, params = tiny_a_model
    ids = np.asarray(bundled().encode(golden_ppl["text"]))
    one = evaluate(config, params, ids, length=32, stride=16, batch_size=1)
    assert one.sum_nll == pytest.approx(golden_ppl["strides"]["16"]["sum_nll"], rel=1e-6)


@pytest.fixture(scope="module")
def tiny_a_model():
    from gpt2cli.hub import load_model

    return load_model(str(TINY_A))


def test_bad_stride_is_a_clear_error():
    with pytest.raises(UserError, match="stride must be between 1 and the window length"):
        windows(100, 32, 33)
