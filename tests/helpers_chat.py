"""Shared by the chat tests: one engine on the tiny-a fixture per test process."""

from __future__ import annotations

import functools

from tests.conftest import TINY_A


@functools.cache
def tiny_engine():
    """(engine, tokenizer) for tests/fixtures/tiny-a: n_positions 128, the real GPT-2 vocab."""
    from gpt2cli.generate import Engine
    from gpt2cli.hub import load_model, load_tokenizer

    config, params = load_model(str(TINY_A))
    return Engine(config, params, dtype="float32"), load_tokenizer(None, str(TINY_A))


def greedy_session(max_new_tokens: int = 6, **kwargs):
    """A ChatSession on tiny-a that decodes greedily (SamplingParams' defaults)."""
    from gpt2cli.chat import ChatSession

    engine, tokenizer = tiny_engine()
    return ChatSession(engine, tokenizer, max_new_tokens=max_new_tokens, **kwargs)
