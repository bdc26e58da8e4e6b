"""The bundled `shakespeare` demo model: every command takes it, offline, and it has learned
English verse (scripts/train_demo.py trained it; its loss on the held-out last 10% of Tiny
Shakespeare is in the issue-12 note)."""

from __future__ import annotations

import json

import pytest

from gpt2cli.hub import BUNDLED
from tests.conftest import cli, run_gpt2

# Not from the training text: a passage the model has never seen (Sonnet 18, public domain).
VERSE = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT2_NO_COMPILE_CACHE", "1")
    monkeypatch.chdir(tmp_path)


def test_it_is_small_and_inspectable():
    assert BUNDLED["shakespeare"].stat().st_size <= 8 * 2**20
    done = cli("inspect", "shakespeare", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["config"]["n_layer"] == 4 and report["config"]["vocab_size"] == 50257
    assert report["nonfinite"] == []


def test_it_writes_shakespeare_flavoured_text():
    done = cli("generate", "ROMEO:", "-m", "shakespeare", "-n", "40")
    assert done.exit_code == 0, done.output
    text = done.stdout
    assert text.startswith("ROMEO:")
    words = text.split()
    assert len(set(words)) >= 10, text  # not one token repeated
    common = {"the", "and", "I", "to", "of", "my", "you", "a", "that", "is", "thou", "not"}
    assert common & {w.strip(",.;:!?") for w in words}, text


def test_its_loss_on_unseen_verse_is_far_below_chance(tmp_path):
    (tmp_path / "sonnet.txt").write_text(VERSE)
    done = cli("eval", "-m", "shakespeare", "--dataset", "sonnet.txt", "--json")
    assert done.exit_code == 0, done.output
    loss = json.loads(done.stdout)["loss"]
    assert loss < 6.0, loss  # a uniform guess over 50257 tokens: 10.8 nats


def test_piped_chat_answers():
    done = run_gpt2("chat", "-m", "shakespeare", "--max-new-tokens", "8", input="Good morrow\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n\n") and done.stdout.strip()


def test_the_default_model_unreachable_suggests_the_demo(tmp_path):
    done = run_gpt2("generate", "hi", env={"HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 1
    assert "-m shakespeare" in done.stderr
