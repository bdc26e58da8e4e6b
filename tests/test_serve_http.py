"""`gpt2 serve` as a user meets it: a subprocess on a free port with tiny-a, spoken to with the
official `openai` client and raw HTTP."""

from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpt2cli.engine import Engine, SamplingParams
from gpt2cli.generate import batch_generate, generate
from gpt2cli.tokenizer import bundled
from tests.helpers_serve import SERVE_KEY as KEY
from tests.helpers_serve import ServerProcess, metric, post_json, request, sse_events

openai = pytest.importorskip("openai", reason="the official client (a dev dependency)")
pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny-a"


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def engine(tiny_a):
    return Engine(*tiny_a, batch=1)


@pytest.fixture(scope="module")
def tok():
    return bundled()


def test_health_is_503_until_compiled_then_200(server):
    assert server.health_seen[-1] == 200
    assert 503 in server.health_seen  # compiling takes seconds: the first polls saw it


def test_models(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, _, body = post_json(
        server.port, "/v1/completions", {"model": "nope", "prompt": "x"}, AUTH
    )
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert body["error"]["param"] == "model"


def test_completion_greedy_and_seeded_equal_generate(client, engine, tok):
    prompt = "The quick brown fox"
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    expected = generate(engine, tok, tok.encode(prompt), max_new_tokens=20)
    assert greedy.choices[0].text == expected.text
    assert greedy.choices[0].finish_reason == "length"
    assert greedy.usage.prompt_tokens == len(tok.encode(prompt))
    assert greedy.usage.completion_tokens == 20
    sp = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    seeded = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=20,
        temperature=0.9,
        top_p=0.95,
        seed=11,
        extra_body={"top_k": 40},
    )
    sampled = generate(engine, tok, tok.encode(prompt), max_new_tokens=20, sampling=sp)
    assert seeded.choices[0].text == sampled.text != expected.text


def test_streamed_completion_equals_the_whole_one(client, server):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])
    status, headers, raw = request(
        server.port, "POST", "/v1/completions", {**kwargs, "stream": True}, AUTH
    )
    events = sse_events(raw)
    assert headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])


def test_chat_streams_role_first_then_content_then_finish(client, server):
    messages = [{"role": "user", "content": "Hi there"}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    assert whole.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == whole.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices[0].delta.content is None


def test_chat_prompt_is_gpt2_chats_transcript(server, tok):
    from gpt2cli.chat import TEMPLATES

    template = TEMPLATES["chat"]
    messages = [{"role": "user", "content": "Hello  there\n friend"}]
    _, _, body = post_json(server.port, "/tokenize", {"messages": messages}, AUTH)
    assert body["tokens"] == tok.encode(template.system) + tok.encode(
        template.turn_prompt("Hello there friend")
    )


def test_n_choices_are_gpt2_generates_num_samples(client, engine, tok):
    prompt = "In the beginning"
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, n=3, temperature=1.0, seed=5
    )
    expected = batch_generate(
        engine,
        tok,
        [tok.encode(prompt)],
        num_samples=3,
        max_new_tokens=10,
        sampling=SamplingParams(temperature=1.0, seed=5),
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [e.text for e in expected]
    assert len({c.text for c in out.choices}) > 1


def test_logprobs(client):
    out = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy takes the best
    assert "".join(lp.tokens) == out.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-5)


def test_stop_string_split_across_tokens_is_never_sent(client, server, tok):
    kwargs = dict(model=MODEL, prompt="The quick brown fox", max_tokens=30, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    ids = tok.encode(full)
    head = tok.decode(ids[:3])
    stop = full[len(head) - 2 : len(head) + 2]  # two characters each side of a token boundary
    assert len(stop) == 4
    cut = full[: full.index(stop)]
    out = client.completions.create(**kwargs, stop=[stop, "never-seen"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**kwargs, stop=stop, stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("char", ["😀", "語"])
def test_split_characters_stream_whole(client, tok, char):
    """A character cut across tokens arrives whole, never as U+FFFD: force its tokens with
    logit_bias and find a seed that draws them in order."""
    ids = tok.encode(char)
    assert len(ids) == 2
    bias = {str(i): 100 for i in ids}
    kwargs = dict(model=MODEL, prompt="Say", max_tokens=2, temperature=1.0, logit_bias=bias)
    for seed in range(40):
        if client.completions.create(**kwargs, seed=seed).choices[0].text == char:
            break
    else:
        pytest.fail("no seed drew the tokens in order")
    chunks = list(client.completions.create(**kwargs, seed=seed, stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == char
    assert all("\ufffd" not in t for t in texts)


def test_errors_have_openais_shape(server):
    def error(body, headers=AUTH, path="/v1/completions"):
        status, _, payload = post_json(server.port, path, body, headers)
        assert set(payload["error"]) == {"message", "type", "param", "code"}
        return status, payload["error"]

    assert error({"prompt": "x", "temperature": -1})[1]["param"] == "temperature"
    assert error({"prompt": "x", "top_p": "high"})[1]["param"] == "top_p"
    assert error({"prompt": "x", "stop": list("abcdefghijklmnopq")})[1]["param"] == "stop"  # 17
    assert error({"prompt": "x", "suffix": "y"})[1]["param"] == "suffix"
    assert error({"prompt": "x", "wat": 1})[1]["param"] == "wat"
    assert (
        error({"prompt": "x", "stream_options": {"include_usage": True}})[1]["param"]
        == "stream_options"
    )
    assert error({"prompt": "x", "logit_bias": {"999999": 1}})[1]["param"] == "logit_bias"
    status, e = error({"prompt": "word " * 100, "max_tokens": 100})
    assert (status, e["code"], e["param"]) == (400, "context_length_exceeded", "prompt")
    status, e = error({"messages": [{"role": "tool", "content": "x"}]}, path="/v1/chat/completions")
    assert status == 400 and e["param"] == "messages[0].role"
    status, _, raw = request(server.port, "POST", "/v1/completions", b"{not json", AUTH)
    assert status == 400 and b"invalid_json" in raw
    assert error({"prompt": "x"}, headers={})[0] == 401
    assert error({"prompt": "x"}, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert request(server.port, "GET", "/health")[0] == 200  # open without a key
    big = b'{"prompt": "' + b"a" * (1 << 21) + b'"}'
    status, _, raw = request(server.port, "POST", "/v1/completions", big, AUTH)
    assert status == 413 and b"request_too_large" in raw
    assert request(server.port, "GET", "/v1/nothing", headers=AUTH)[0] == 404
    # and it still serves
    status, _, body = post_json(
        server.port, "/v1/completions", {"prompt": "x", "max_tokens": 2}, AUTH
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_tokenize_and_detokenize(server, tok):
    _, _, body = post_json(server.port, "/tokenize", {"prompt": "Hello world 語"}, AUTH)
    assert body["tokens"] == tok.encode("Hello world 語") and body["count"] == len(body["tokens"])
    _, _, back = post_json(server.port, "/detokenize", {"tokens": body["tokens"]}, AUTH)
    assert back["prompt"] == "Hello world 語"


def test_eight_concurrent_greedy_equal_one_by_one(client):
    prompts = [f"Story number {i}: once there was" for i in range(8)]

    def ask(prompt):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        return out.choices[0].text

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert len(set(alone)) > 1


def _stream_then_hang_up(port: int, body: dict, read_first: bool) -> None:
    """Send a request on a raw socket, maybe read its first bytes, then close the connection."""
    import json

    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        if read_first:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        else:
            time.sleep(0.15)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_and_frees_the_row(server, client, stream):
    cancelled = metric(server.port, "gpt2_cancelled_total", AUTH)
    generated = metric(server.port, "gpt2_generated_tokens_total", AUTH)
    body = {"prompt": "A long story:", "max_tokens": 120, "temperature": 0.8, "stream": stream}
    _stream_then_hang_up(server.port, body, read_first=stream)
    end = time.monotonic() + 10
    while metric(server.port, "gpt2_cancelled_total", AUTH) == cancelled and time.monotonic() < end:
        time.sleep(0.05)
    assert metric(server.port, "gpt2_cancelled_total", AUTH) == cancelled + 1
    while metric(server.port, "gpt2_busy_rows", AUTH) and time.monotonic() < end:
        time.sleep(0.01)  # the engine frees the row before its next chunk
    assert metric(server.port, "gpt2_busy_rows", AUTH) == 0
    assert metric(server.port, "gpt2_generated_tokens_total", AUTH) - generated < 120
    start = time.monotonic()
    out = client.completions.create(model=MODEL, prompt="Next", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length" and time.monotonic() - start < 10


def test_queue_full_503_then_sigterm_finishes_the_stream_and_exits_0():
    s = ServerProcess(
        "--max-batch", "1", "--max-queue", "1", "--decode-chunk", "1", "--grace", "30"
    )
    try:
        s.wait_ready()
        # <|endoftext|> barred: a sampled end of text would finish with "stop", not "length"
        body = {
            "prompt": "A long story:",
            "max_tokens": 120,
            "temperature": 0.8,
            "logit_bias": {"50256": -100},
            "stream": True,
        }
        results = {}

        def stream(name):
            results[name] = request(s.port, "POST", "/v1/completions", body)

        first = threading.Thread(target=stream, args=("first",))
        first.start()
        end = time.monotonic() + 30
        while metric(s.port, "gpt2_busy_rows") < 1 and time.monotonic() < end:
            time.sleep(0.01)
        second = threading.Thread(target=stream, args=("second",))
        second.start()
        while metric(s.port, "gpt2_queue_length") < 1 and time.monotonic() < end:
            time.sleep(0.01)
        start = time.monotonic()
        status, headers, raw = request(s.port, "POST", "/v1/completions", body)
        assert (status, headers.get("retry-after")) == (503, "1") and b"queue_full" in raw
        assert time.monotonic() - start < 2  # at once, not after a wait
        s.proc.send_signal(__import__("signal").SIGTERM)
        first.join(60)
        second.join(60)
        assert s.proc.wait(60) == 0
        for name in ("first", "second"):
            status, _, raw = results[name]
            events = sse_events(raw)
            assert status == 200 and events[-1] == "[DONE]"
            assert events[-2]["choices"][0]["finish_reason"] == "length"
    finally:
        s.stop()


def test_overload_every_request_completes_or_gets_503_none_starves(server):
    """More clients than rows + queue, each sending again at once: every request completes or
    is refused at once; none waits forever (prompts are read oldest first, whatever row)."""
    import json as _json
    from urllib.request import Request, urlopen

    url = f"http://127.0.0.1:{server.port}/v1/completions"
    body = _json.dumps({"prompt": "Hello there", "max_tokens": 6, "stream": True}).encode()
    outcomes: list = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if sum(o == 200 for o in outcomes) >= 150:
                    return
            start = time.monotonic()
            request_ = Request(url, body, {**AUTH, "Content-Type": "application/json"})
            try:
                with urlopen(request_, timeout=30) as response:
                    events = sse_events(response.read())
                    outcome = 200 if events[-1] == "[DONE]" else "truncated"
            except Exception as exc:  # noqa: BLE001 - an HTTP 503, or a hang (timeout)
                outcome = getattr(exc, "code", type(exc).__name__)
                if outcome == 503:
                    assert time.monotonic() - start < 5
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(outcomes) <= {200, 503}, [o for o in outcomes if o not in (200, 503)]
    assert sum(o == 200 for o in outcomes) >= 150


def stderr_after_exit(s: ServerProcess) -> str:
    """The server's whole log once it exited (its reader thread may lag behind the exit)."""
    end = time.monotonic() + 5
    while "stopped" not in s.stderr and time.monotonic() < end:
        time.sleep(0.05)
    return s.stderr


def test_answered_at_once_then_sigterm_while_compiling_exits_0_promptly():
    """The default warm-up: a request sent as soon as /health is 200 is answered while the
    other programs still compile in the background; a SIGTERM then stops the compiles and the
    server within seconds, exit 0, and 'ready' is never logged after 'Shutting down'."""
    s = ServerProcess("--max-batch", "8")
    try:
        s.wait_ready()
        body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0}
        status, _, out = post_json(s.port, "/v1/completions", body)
        assert status == 200 and out["choices"][0]["finish_reason"] == "length"
        assert metric(s.port, "gpt2_programs_waiting") > 0  # the background still compiles
        assert metric(s.port, "gpt2_programs_compiled") >= 4
        start = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
        assert time.monotonic() - start < 10
        log = stderr_after_exit(s)
        assert "Traceback" not in log
        assert "ready" in log and "ready" not in log[log.index("Shutting down") :]
    finally:
        s.stop()


def test_sigterm_before_ready_never_says_ready():
    """A SIGTERM while the first programs compile: the server stops (exit 0, or 143 when the
    signal came before the handlers were installed) and never says it is ready after it."""
    s = ServerProcess()
    try:
        end = time.monotonic() + 120
        while "compiling" not in s.stderr and time.monotonic() < end:
            time.sleep(0.01)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) in (0, -signal.SIGTERM)
        log = s.stderr if s.proc.returncode else stderr_after_exit(s)
        assert "Traceback" not in log
        if "Shutting down" in log:
            assert "ready" not in log[log.index("Shutting down") :]
    finally:
        s.stop()
