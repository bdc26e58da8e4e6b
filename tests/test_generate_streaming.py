"""Streaming text never splits a UTF-8 character, and equals the non-streamed text."""

import numpy as np
import pytest

from gpt2cli.generate import Engine, TokenRun, generate, stream_generate
from gpt2cli.tokenizer import bundled

TEXT = " Café 🎉 東京タワー 👍🏽 naïve — ok"


@pytest.fixture(scope="module")
def tok():
    return bundled()


def test_the_text_really_splits_characters_across_tokens(tok):
    ids = tok.encode(TEXT)
    alone = [tok.decode([i]) for i in ids]
    assert sum("\ufffd" in piece for piece in alone) >= 4


@pytest.fixture
def scripted(monkeypatch, tok):
    """Make every TokenRun yield the tokens of TEXT, as if the model had chosen them."""
    script = tok.encode(TEXT)

    def fake_iter(self):
        self.prefilled = len(self.prompts[0])
        for token in script[: self.max_new_tokens]:
            column = np.full((len(self.prompts),), token, np.int32)
            self.produced.append(column)
            yield column

    monkeypatch.setattr(TokenRun, "__iter__", fake_iter)
    return script


def test_streamed_emoji_and_cjk_equal_the_joined_text(scripted, tok, tiny_a):
    engine = Engine(*tiny_a)
    prompt = tok.encode("Say it:")
    pieces = [r.text for r in stream_generate(engine, tok, prompt, max_new_tokens=len(scripted))]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == TEXT
    assert generate(engine, tok, prompt, max_new_tokens=len(scripted)).text == TEXT


def test_cli_stream_equals_no_stream_with_emoji(scripted, monkeypatch):
    from tests.conftest import TINY_A, cli

    monkeypatch.setenv("GPT2_NO_COMPILE_CACHE", "1")
    base = ["generate", "Say it:", "-m", str(TINY_A), "-n", str(len(scripted))]
    streamed = cli(*base)
    printed = cli(*base, "--no-stream")
    assert streamed.exit_code == 0 and printed.exit_code == 0
    assert streamed.stdout == printed.stdout == "Say it:" + TEXT + "\n"
