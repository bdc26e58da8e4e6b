"""Prompt log-probabilities over HTTP (`echo` + `logprobs`), the tokenizer routes and the
request shapes of lm-evaluation-harness, against transformers' numbers
(tests/fixtures/score.json, scripts/make_score_fixtures.py) on the shared tiny-a server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import FIXTURES
from tests.helpers_serve import SERVE_KEY, post_json, request, sse_events

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {SERVE_KEY}"}
EOS = 50256


@pytest.fixture(scope="module")
def port(serve_tiny) -> int:
    return serve_tiny.port


@pytest.fixture(scope="module")
def score_golden() -> dict:
    return json.loads((FIXTURES / "score.json").read_text())


def complete(port: int, **body) -> dict:
    status, _, out = post_json(port, "/v1/completions", {"model": "tiny-a", **body}, AUTH)
    assert status == 200, out
    return out


def check_prompt_entries(logprobs: dict, golden: dict, top: int) -> None:
    n = len(golden["ids"])
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    np.testing.assert_allclose(logprobs["token_logprobs"][1:n], golden["logprobs"], atol=1e-5)
    for got, values in zip(logprobs["top_logprobs"][1:n], golden["top_logprobs"], strict=True):
        assert len(got) <= top  # two ids may show as the same text
        assert max(got.values()) == pytest.approx(values[0], abs=1e-5)
        for value in got.values():
            assert np.min(np.abs(np.asarray(values[:top]) - value)) < 1e-5


def test_echoed_prompts_equal_transformers(port, score_golden):
    prompts = [p for p in score_golden["prompts"] if p["text"] is not None]
    out = complete(port, prompt=[p["text"] for p in prompts], echo=True, logprobs=3, max_tokens=0)
    for choice, golden in zip(out["choices"], prompts, strict=True):
        lp = choice["logprobs"]
        assert choice["text"] == golden["text"] and choice["finish_reason"] == "length"
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(golden["ids"])
        check_prompt_entries(lp, golden, 3)
        lengths = [len(t) for t in lp["tokens"]]
        assert lp["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]
    assert out["usage"]["completion_tokens"] == 0
    assert out["usage"]["prompt_tokens"] == sum(len(p["ids"]) for p in prompts)


def test_eos_inside_a_prompt_is_one_entry(port, score_golden):
    golden = score_golden["prompts"][2]
    assert EOS in golden["ids"]
    out = complete(port, prompt=golden["ids"], echo=True, logprobs=0, max_tokens=0)
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"][golden["ids"].index(EOS)] == "<|endoftext|>"
    assert lp["top_logprobs"] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], golden["logprobs"], atol=1e-5)


def test_a_whole_window_is_scored_and_one_more_token_is_refused(port, score_golden):
    golden = score_golden["prompts"][-1]
    assert len(golden["ids"]) == 128  # tiny-a's window
    out = complete(port, prompt=golden["ids"], echo=True, logprobs=5, max_tokens=0)
    check_prompt_entries(out["choices"][0]["logprobs"], golden, 5)
    for ids, max_tokens in ((golden["ids"] + [13], 0), (golden["ids"], 1)):
        body = {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": max_tokens}
        status, _, err = post_json(port, "/v1/completions", body, AUTH)
        assert status == 400 and err["error"]["code"] == "context_length_exceeded"


def test_a_batch_equals_its_prompts_one_by_one(port, score_golden):
    prompts = [p["text"] for p in score_golden["prompts"][1:4]]
    together = complete(port, prompt=prompts, echo=True, logprobs=2, max_tokens=2, temperature=0)
    for text, choice in zip(prompts, together["choices"], strict=True):
        alone = complete(port, prompt=text, echo=True, logprobs=2, max_tokens=2, temperature=0)
        a, b = alone["choices"][0]["logprobs"], choice["logprobs"]
        assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
        np.testing.assert_allclose(a["token_logprobs"][1:], b["token_logprobs"][1:], atol=1e-6)
        assert alone["choices"][0]["text"] == choice["text"]


def test_a_generated_eos_keeps_its_entry(port):
    out = complete(
        port,
        prompt="Hello, world",
        echo=True,
        logprobs=1,
        max_tokens=4,
        temperature=0,
        logit_bias={str(EOS): 100},
    )
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and choice["text"] == "Hello, world"
    assert lp["tokens"] == ["Hello", ",", " world", "<|endoftext|>"]
    assert lp["token_logprobs"][-1] is not None and lp["top_logprobs"][-1]
    assert lp["text_offset"][-1] == len("Hello, world")


def test_echo_alone_with_no_tokens_returns_the_prompt(port):
    out = complete(port, prompt="Hello, world", echo=True, max_tokens=0)
    assert out["choices"][0]["text"] == "Hello, world"
    assert out["choices"][0]["logprobs"] is None
    status, _, err = post_json(port, "/v1/completions", {"prompt": "x", "max_tokens": 0}, AUTH)
    assert status == 400 and err["error"]["param"] == "max_tokens"


def test_a_stream_sends_the_prompt_with_its_logprobs_first(port, score_golden):
    golden = score_golden["prompts"][1]
    body = {"prompt": golden["text"], "echo": True, "logprobs": 1, "max_tokens": 2}
    status, _, raw = request(port, "POST", "/v1/completions", body | {"stream": True}, AUTH)
    assert status == 200
    events = [e for e in sse_events(raw) if e != "[DONE]"]
    first = events[0]["choices"][0]
    assert first["text"] == golden["text"]
    np.testing.assert_allclose(
        first["logprobs"]["token_logprobs"][1:], golden["logprobs"], atol=1e-5
    )
    generated = [e["choices"][0] for e in events[1:] if e["choices"][0]["logprobs"]]
    offsets = [c["logprobs"]["text_offset"][0] for c in generated]
    assert offsets[0] == len(golden["text"])


def test_the_tokenizer_routes_answer_as_the_harness_probes_them(port):
    status, _, raw = request(port, "GET", "/tokenizer_info", headers=AUTH)
    info = json.loads(raw)
    assert status == 200
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    assert info["model_max_length"] == 128
    for body in ({"prompt": "test", "add_special_tokens": False}, {"prompt": "<|endoftext|>"}):
        status, _, out = post_json(port, "/tokenize", body, AUTH)
        assert status == 200 and isinstance(out["tokens"], list)
    assert out["tokens"] == [EOS]  # the harness's eos_token_id: encode(eos_token)[0]
    status, _, err = post_json(port, "/tokenize", {"prompt": "x", "add_special_tokens": 1}, AUTH)
    assert status == 400 and err["error"]["param"] == "add_special_tokens"


def test_sixteen_stops_are_accepted_and_each_is_honoured(port):
    free = complete(port, prompt="Hello, world", max_tokens=12, temperature=0)["choices"][0]
    stop = free["text"][4:8]
    stops = [f"never-{i}" for i in range(15)] + [stop]
    out = complete(port, prompt="Hello, world", max_tokens=12, temperature=0, stop=stops)
    assert out["choices"][0]["text"] == free["text"][: free["text"].index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    status, _, err = post_json(
        port, "/v1/completions", {"prompt": "x", "stop": stops + ["y"]}, AUTH
    )
    assert status == 400 and err["error"]["param"] == "stop"


# ---- lm-evaluation-harness's `local-completions` model ------------------------------------


def harness_loglikelihood(port: int, requests: list[tuple[list[int], int]]):
    """What the harness sends for a batch of loglikelihood requests (token ids, the context's
    length), and how it reads the answer (openai_completions.py, `parse_logprobs`)."""
    body = {
        "model": "tiny-a",
        "prompt": [tokens for tokens, _ in requests],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    status, _, out = post_json(port, "/v1/completions", body, AUTH)
    assert status == 200, out
    results = []
    choices = sorted(out["choices"], key=lambda c: c["index"])
    for choice, (_, ctxlen) in zip(choices, requests, strict=True):
        token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        greedy = all(
            lp == max(top.values()) for lp, top in zip(token_logprobs, top_logprobs, strict=True)
        )
        results.append((sum(token_logprobs), greedy))
    return results


def test_harness_loglikelihood_requests_equal_transformers(port, score_golden):
    choices = score_golden["tasks"]["hellaswag.jsonl"][0]["choices"]
    requests = [(c["sequence"], len(c["sequence"]) - len(c["logprobs"])) for c in choices]
    results = harness_loglikelihood(port, requests)
    for (total, _), golden in zip(results, choices, strict=True):
        assert total == pytest.approx(sum(golden["logprobs"]), abs=1e-4)


def test_harness_is_greedy_reads_top_logprobs(port, golden):
    prompt = golden["arrays"]["tiny_a/gen0/prompt_ids"].tolist()
    greedy = golden["arrays"]["tiny_a/gen0/tokens"].tolist()[:8]
    other = greedy[:4] + [13] + greedy[5:]
    results = harness_loglikelihood(
        port, [(prompt + greedy, len(prompt)), (prompt + other, len(prompt))]
    )
    assert [g for _, g in results] == [True, False]
    assert results[0][0] > results[1][0]


def test_harness_generation_request_with_its_stop_list(port):
    body = {
        "prompt": ["Hello, world", "The capital of France"],
        "model": "tiny-a",
        "max_tokens": 8,
        "temperature": 0,
        "stop": ["\n\n", "Question:", "Q:", "</s>", "<|im_end|>", "<|endoftext|>"],
        "seed": 1234,
    }
    status, _, out = post_json(port, "/v1/completions", body, AUTH)
    assert status == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert all(isinstance(c["text"], str) for c in out["choices"])
