"""`gpt2 serve`'s prefix cache and chat window over HTTP (the shared tiny-a server, whose
window is 128 tokens): a chat turn reads only its new message and says so in its usage;
truncation "auto" drops the oldest turns as `gpt2 chat` does, strict requests still fail."""

from __future__ import annotations

import pytest

from gpt2cli.chat import TEMPLATES, render, turns_to_drop
from gpt2cli.tokenizer import bundled
from tests.helpers_serve import SERVE_KEY, metric, post_json, request, sse_events

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {SERVE_KEY}"}


def chat(port: int, messages: list[dict], **fields):
    body = {"messages": messages, "temperature": 0, **fields}
    return post_json(port, "/v1/chat/completions", body, AUTH)


def test_a_chat_turn_starts_from_the_last_one(serve_tiny):
    port = serve_tiny.port
    hits = metric(port, "gpt2_prefix_cache_hits_total", AUTH)
    first = [{"role": "user", "content": "Tell me about the sea"}]
    status, _, one = chat(port, first, max_tokens=8)
    assert status == 200
    reply = one["choices"][0]["message"]["content"]
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
    status, _, two = chat(port, second, max_tokens=8)
    assert status == 200
    cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert one["usage"]["prompt_tokens"] <= cached < two["usage"]["prompt_tokens"]
    assert metric(port, "gpt2_prefix_cache_hits_total", AUTH) >= hits + 1
    assert metric(port, "gpt2_prefix_cache_tokens_total", AUTH) >= cached
    assert metric(port, "gpt2_prefix_cache_bytes", AUTH) > 0
    status, _, again = chat(port, second, max_tokens=8)  # the same request, the cache warmer
    assert again["choices"][0]["message"] == two["choices"][0]["message"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == (
        two["usage"]["prompt_tokens"] - 1
    )


def history(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "A talk."}]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"Question number {i} about the weather today"},
            {"role": "assistant", "content": f"Answer number {i}: it is sunny and warm"},
        ]
    return [*messages, {"role": "user", "content": "And tomorrow?"}]


def lengths(messages: list[dict]) -> tuple[int, list[int], int]:
    """Tokens of a `history`'s preamble, of each past turn, of the new turn."""
    pairs = [(m["role"], m["content"]) for m in messages]
    rendered = render(pairs, TEMPLATES["chat"], bundled())
    parts = [len(part) for part, _ in rendered.parts]  # user, assistant, ..., the new user turn
    turns = [u + a for u, a in zip(parts[:-1:2], parts[1:-1:2], strict=True)]
    return len(rendered.preamble), turns, parts[-1]


def test_truncation_auto_drops_the_oldest_turns_as_gpt2_chat(serve_tiny):
    port = serve_tiny.port
    messages = history(6)  # ~130 tokens: over the 128-token window
    status, _, body = chat(port, messages, max_tokens=32)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, _, body = chat(port, messages, max_tokens=32, truncation="disabled")
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"

    preamble, turns, new = lengths(messages)
    drop = turns_to_drop(preamble, turns, new, 128 - 32)
    assert drop > 0
    status, _, body = chat(port, messages, max_tokens=32, truncation="auto")
    assert status == 200 and body["dropped_messages"] == 2 * drop
    assert body["usage"]["prompt_tokens"] == preamble + sum(turns[drop:]) + new
    kept = [messages[0], *messages[1 + 2 * drop :]]
    _, _, same = chat(port, kept, max_tokens=32)
    assert same["choices"][0]["message"] == body["choices"][0]["message"]
    assert "dropped_messages" not in same


def test_truncation_auto_streams_the_count_and_refuses_what_cannot_fit(serve_tiny):
    port = serve_tiny.port
    body = {"messages": history(6), "max_tokens": 32, "truncation": "auto", "stream": True}
    status, _, raw = request(port, "POST", "/v1/chat/completions", body, AUTH)
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    drop = turns_to_drop(*lengths(history(6)), 128 - 32)
    assert {event["dropped_messages"] for event in events[:-1]} == {2 * drop}
    huge = [{"role": "user", "content": "word " * 200}]
    status, _, body = chat(port, huge, max_tokens=4, truncation="auto")
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, _, body = chat(port, history(0), truncation="middle")
    assert status == 400 and body["error"]["param"] == "truncation"
