"""The HTTP layer alone (uvicorn in a thread, no model loaded): auth, CORS, limits, loading,
internal errors, all in OpenAI's error shape."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("starlette", reason="gpt2 serve needs starlette (pip install starlette)")

from gpt2cli.serve.app import create_app
from gpt2cli.serve.scheduler import Scheduler
from tests.helpers_serve import (
    FakeEngine,
    fake_app,
    metric,
    request,
    sse_events,
    uvicorn_thread,
)

KEY = "k"


class Flaky:
    """A `programs` stand-in whose config fails once: an internal error in a handler."""

    compiled_count = 0

    def __init__(self):
        self.calls = 0

    @property
    def config(self):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom")
        return type("Config", (), {"n_positions": 128})()


def loading_app(**kwargs):
    """An app whose engine never finishes loading (its thread is not started)."""
    scheduler = Scheduler(lambda: None, max_batch=2)
    return create_app(scheduler, model_name="m", **kwargs), scheduler


@pytest.fixture(scope="module")
def port():
    app, _ = loading_app(api_key=KEY, max_body=1000)
    with uvicorn_thread(app) as port:
        yield port


def error_of(raw: bytes) -> dict:
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_health_is_503_while_loading_and_needs_no_key(port):
    status, _, raw = request(port, "GET", "/health")
    assert status == 503 and json.loads(raw) == {"status": "loading"}
    status, headers, raw = request(
        port, "POST", "/v1/completions", {"prompt": "x"}, {"Authorization": f"Bearer {KEY}"}
    )
    assert status == 503 and headers["retry-after"] == "1"
    assert error_of(raw)["code"] == "model_loading"


def test_api_key_is_required(port):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        status, _, raw = request(port, "GET", "/v1/models", headers=headers)
        assert status == 401 and error_of(raw)["code"] == "invalid_api_key"
    status, _, raw = request(port, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and json.loads(raw)["data"][0]["id"] == "m"
    assert request(port, "GET", "/")[0] == 200  # the page itself is open


def test_limits_and_routes_in_openais_shape(port):
    auth = {"Authorization": f"Bearer {KEY}"}
    status, _, raw = request(port, "POST", "/v1/completions", b"x" * 2000, auth)
    assert status == 413 and error_of(raw)["code"] == "request_too_large"
    status, _, raw = request(port, "GET", "/v1/completions", headers=auth)
    assert status == 405 and error_of(raw)["type"] == "invalid_request_error"
    status, _, raw = request(port, "GET", "/v2/anything", headers=auth)
    assert status == 404 and error_of(raw)["type"] == "not_found_error"
    status, _, raw = request(port, "GET", "/v1/models/other", headers=auth)
    assert status == 404 and error_of(raw)["code"] == "model_not_found"


def test_cors_is_off_unless_origins_are_given(port):
    headers = {"Origin": "http://localhost:3000", "Authorization": f"Bearer {KEY}"}
    _, got, _ = request(port, "GET", "/v1/models", headers=headers)
    assert "access-control-allow-origin" not in {k.lower() for k in got}
    app, _ = loading_app(api_key=KEY, cors_origins=["http://localhost:3000"])
    with uvicorn_thread(app) as cors_port:
        _, got, _ = request(cors_port, "GET", "/v1/models", headers=headers)
        assert got["access-control-allow-origin"] == "http://localhost:3000"
        preflight = {
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        status, got, _ = request(cors_port, "OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 200 and got["access-control-allow-origin"] == "http://localhost:3000"
        other = {**preflight, "Origin": "http://evil.example"}
        assert request(cors_port, "OPTIONS", "/v1/chat/completions", headers=other)[0] == 400


def test_internal_error_is_500_and_the_server_keeps_serving():
    app, scheduler = loading_app()
    scheduler.programs = Flaky()
    with uvicorn_thread(app) as port:
        status, _, raw = request(port, "GET", "/v1/models")
        assert status == 500 and error_of(raw)["code"] == "internal_error"
        status, _, raw = request(port, "GET", "/v1/models")
        assert status == 200 and json.loads(raw)["data"][0]["max_model_len"] == 128
        metrics = request(port, "GET", "/metrics")[2].decode()
        assert 'gpt2_requests_total{endpoint="/v1/models",status="500"} 1' in metrics


def test_serve_command_refuses_bad_flags_in_one_line(tmp_path):
    from tests.conftest import cli

    for args, message in (
        (["--max-batch", "0"], "--max-batch: must be at least 1"),
        (["--grace", "-1"], "--grace: must be 0 or more seconds"),
        (["--prefix-cache-mb", "-1"], "--prefix-cache-mb: must be 0 or more"),
        (["--request-timeout", "0"], "--request-timeout: must be more than 0 seconds"),
        (["--port", "70000"], "--port: must be from 0 to 65535"),
        (["--host", ""], "--host: is empty"),
        (["--api-key", "sekret "], "--api-key: starts or ends with white space"),
        (["--api-key", " "], "--api-key: is empty"),
    ):
        result = cli("serve", *args)
        assert result.exit_code == 2, result.output  # usage errors, as README says
        assert message in result.output and "Traceback" not in result.output
    result = cli("serve", "-m", str(tmp_path / "missing.npz"))
    assert result.exit_code == 1 and "does not exist" in result.output
    help_text = cli("serve", "--help").output
    assert "gpt2 serve -m gpt2.npz" in help_text and "--max-queue" in help_text


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    import socket
    import time

    from tests.conftest import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        # a missing model would fail too, but later: the port is checked first
        result = cli("serve", "-m", str(tmp_path / "missing.npz"), "--port", str(port))
    assert result.exit_code == 1 and time.monotonic() - start < 5
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("flag", ["--served-name", "--model-name"])
def test_the_served_id_has_its_own_flag_and_the_old_spelling(monkeypatch, flag):
    from gpt2cli.cli import serve_cmd
    from tests.conftest import TINY_A, cli

    served = {}

    def run(app, scheduler, sock, *args):
        served["app"] = app
        sock.close()

    monkeypatch.setattr(serve_cmd, "_run", run)
    result = cli("serve", "-m", str(TINY_A), flag, "my-gpt2", "--port", "0")
    assert result.exit_code == 0, result.output
    assert served["app"].state.server.model_name == "my-gpt2"


# ---- a hostile client (issue 22): every case a 4xx in OpenAI's shape, never a 500 ----------


@pytest.fixture(scope="module")
def refusing():
    """A ready app whose queue takes nothing: a request that passes validation gets a 503."""
    app, _ = fake_app(FakeEngine(max_queue=0))
    with uvicorn_thread(app) as port:
        yield port


def status_of(port, path, body, headers=None):
    status, _, raw = request(port, "POST", path, body, headers)
    return status, (error_of(raw) if status != 200 else json.loads(raw))


def statuses(port) -> dict:
    text = request(port, "GET", "/metrics")[2].decode()
    return {
        line.split('status="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("gpt2_requests_total{")
    }


NUMERIC = {
    "completions": [
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "n",
        "logprobs",
    ],
    "chat/completions": ["max_completion_tokens", "top_logprobs"],
}


def test_a_400_digit_integer_in_any_numeric_field_is_never_a_500(refusing):
    huge = 10**400
    for route, fields in NUMERIC.items():
        base = {"prompt": "x"} if route == "completions" else {"messages": [USER]}
        for name in fields:
            body = {**base, name: huge}
            if name == "top_logprobs":
                body["logprobs"] = True
            status, error = status_of(refusing, f"/v1/{route}", body)
            # seed is used modulo 2**32 and top_k means "all": both valid, so queue_full
            expected = (503, "queue_full") if name in ("seed", "top_k") else (400, None)
            assert (status, error["code"] if status == 503 else None) == expected, name
            if status == 400:  # a huge max_tokens is too long for the window
                window = {"max_tokens": "prompt", "max_completion_tokens": "messages"}
                assert error["param"] == window.get(name, name)
    for route in ("/v1/completions", "/tokenize"):
        status, error = status_of(refusing, route, {"prompt": [huge]})
        assert status == 400 and error["param"] == "prompt"
    assert "500" not in statuses(refusing)


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", b"[" * 100_000, None),  # nested too deeply for Python
        ("/v1/completions", {"prompt": "x", "model": []}, "model"),
        ("/v1/chat/completions", {"messages": [USER], "model": {}}, "model"),
        ("/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}', "prompt[1]"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages[0].content",
        ),
        ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
        ("/tokenize", {"prompt": "x", "model": ["m"]}, "model"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {" 5 ": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"1_0": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"٣": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "stop": ""}, "stop"),
        ("/v1/chat/completions", {"messages": [USER], "stop": ["\n", ""]}, "stop"),
        (
            "/v1/chat/completions",
            {"messages": [{**USER, "name": "ann"}]},
            "messages[0].name",
        ),
        ("/v1/chat/completions", {"messages": [{**USER, "mood": "x"}]}, "messages[0].mood"),
    ],
)
def test_hostile_bodies_are_400s_naming_the_field(refusing, path, body, param):
    status, error = status_of(refusing, path, body)
    assert status == 400 and error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_a_message_field_given_as_null_and_a_surrogate_pair_are_accepted(refusing):
    message = {**USER, "name": None, "refusal": None}
    status, error = status_of(refusing, "/v1/chat/completions", {"messages": [message]})
    assert (status, error["code"]) == (503, "queue_full")
    status, body = status_of(refusing, "/tokenize", b'{"prompt": "\\ud83d\\ude00"}')
    assert status == 200 and body["count"] == 2  # one emoji, two byte-level tokens


def test_tokenize_and_detokenize_check_the_model(refusing):
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        status, error = status_of(refusing, path, {**body, "model": "other"})
        assert (status, error["code"], error["param"]) == (404, "model_not_found", "model")
        assert status_of(refusing, path, {**body, "model": "m"})[0] == 200


def test_a_client_that_closes_mid_body_is_a_499_not_an_error(refusing):
    import socket
    import time

    with socket.create_connection(("127.0.0.1", refusing)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "'
        )
        time.sleep(0.2)
    end = time.monotonic() + 10
    while "499" not in statuses(refusing) and time.monotonic() < end:
        time.sleep(0.05)
    assert "499" in statuses(refusing) and "500" not in statuses(refusing)


def test_keys_and_tokens_outside_ascii_compare_as_bytes():
    app, _ = fake_app(api_key="clé")
    with uvicorn_thread(app) as port:
        for token, expected in (("clé", 200), ("cle", 401), ("日本", 401)):
            header = f"Bearer {token}".encode()  # as a client sends it: UTF-8 bytes
            status, _, raw = request(port, "GET", "/v1/models", headers={"Authorization": header})
            assert status == expected, raw
    app, _ = fake_app(api_key="plain")
    with uvicorn_thread(app) as port:
        auth = {"Authorization": "Bearer clé".encode()}
        status, _, raw = request(port, "GET", "/v1/models", headers=auth)
        assert status == 401 and error_of(raw)["code"] == "invalid_api_key"


def test_cors_preflight_of_openais_javascript_sdk_is_allowed():
    app, _ = fake_app(cors_origins=["http://localhost:3000"])
    with uvicorn_thread(app) as port:
        preflight = {
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, "
            "x-stainless-os, x-stainless-lang, x-stainless-retry-count, openai-beta",
        }
        status, got, _ = request(port, "OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 200 and got["access-control-allow-origin"] == "http://localhost:3000"
        allowed = got["access-control-allow-headers"].lower()
        assert "x-stainless-retry-count" in allowed and "openai-beta" in allowed
        other = {**preflight, "Origin": "http://evil.example"}
        assert request(port, "OPTIONS", "/v1/chat/completions", headers=other)[0] == 400


def test_prompt_tokens_count_served_requests_only():
    app, engine = fake_app(FakeEngine(tokens=2))
    with uvicorn_thread(app) as port:
        prompt = "one two three"
        n = len(engine.tokenizer.encode(prompt))
        assert status_of(port, "/v1/completions", {"prompt": prompt, "n": 99})[0] == 400
        assert metric(port, "gpt2_prompt_tokens_total") == 0
        assert status_of(port, "/v1/completions", {"prompt": prompt})[0] == 200
        body = {"prompt": prompt, "stream": True}
        assert request(port, "POST", "/v1/completions", body)[0] == 200
        assert metric(port, "gpt2_prompt_tokens_total") == 2 * n
    engine.max_queue = 0
    with uvicorn_thread(app) as port:
        assert status_of(port, "/v1/completions", {"prompt": prompt})[0] == 503
        assert metric(port, "gpt2_prompt_tokens_total") == 2 * n


def test_metrics_print_whole_numbers_exactly():
    from gpt2cli.serve.metrics import Counter, Histogram

    counter = Counter("c_total", "c")
    counter.inc(1_024_983)
    counter.inc()
    assert counter.render()[-1] == "c_total 1024984"  # :g printed 1.02498e+06
    histogram = Histogram("h", "h")
    histogram.observe(1_234_567)
    histogram.observe(0.125)
    assert "h_sum 1234567.125" in histogram.render()


# ---- shutdown, timeouts, a busy event loop ------------------------------------------------


@contextmanager
def listening(app, *, grace=10.0, request_timeout=30.0):
    """`gpt2 serve`'s uvicorn Server on a thread (no signal handlers) -> (port, server)."""
    import uvicorn

    from gpt2cli.serve.listen import Server, bind, timed_h11

    sock = bind("127.0.0.1", 0)
    config = uvicorn.Config(
        app,
        http=timed_h11(request_timeout),
        timeout_graceful_shutdown=None,
        log_config=None,  # records reach pytest's caplog
        lifespan="off",
    )
    server = Server(config, grace, app.state.server.shut_down)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started and time.monotonic() < end:
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = server.hurry = True
        thread.join(30)
        assert not thread.is_alive()


def in_thread(results: dict, name: str, *args, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.update({name: request(*args, **kwargs)}))
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["grace ran out", "a second signal"])
def test_shutdown_ends_every_request_in_openais_shape(caplog, how):
    """Requests that outlive the grace (or a second Ctrl-C) get a 503 shutting_down, or, on a
    stream, an error event and [DONE]; no task is cancelled under them (no traceback)."""
    import signal

    app, engine = fake_app(FakeEngine(hang=True))  # no request ever finishes by itself
    grace = 0.5 if how == "grace ran out" else 60
    with listening(app, grace=grace) as (port, server):
        results = {}
        threads = [
            in_thread(results, "whole", port, "POST", "/v1/completions", {"prompt": "x"}),
            in_thread(
                results,
                "stream",
                port,
                "POST",
                "/v1/chat/completions",
                {"messages": [USER], "stream": True},
            ),
        ]
        end = time.monotonic() + 10
        while len(engine.submitted) < 2 and time.monotonic() < end:
            time.sleep(0.02)
        start = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        if how == "a second signal":
            time.sleep(0.3)
            server.handle_exit(signal.SIGINT, None)
        for thread in threads:
            thread.join(10)
        assert time.monotonic() - start < 5
    status, headers, raw = results["whole"]
    assert (status, error_of(raw)["code"]) == (503, "shutting_down")
    status, _, raw = results["stream"]
    events = sse_events(raw)
    assert status == 200 and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["error"]["code"] == "shutting_down" and events[-1] == "[DONE]"
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert all(job.cancelled for job in engine.submitted)


def test_a_half_sent_request_and_an_idle_connection_are_closed():
    import socket

    app, _ = fake_app()
    with listening(app, request_timeout=0.5) as (port, _):
        for sent in (b"", b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Le"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(sent)
                start = time.monotonic()
                assert sock.recv(100) == b""  # closed by the server
                assert 0.3 < time.monotonic() - start < 5
        body = b'{"prompt": "hello"}'
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            time.sleep(0.8)  # the headers alone are not the request: the body is late too
            with contextlib.suppress(OSError):
                sock.sendall(body)
            assert sock.recv(100) == b""
        # a request sent in time is answered, however slowly it is then answered
        status, _, raw = request(port, "POST", "/tokenize", {"prompt": "hello"})
        assert status == 200 and json.loads(raw)["count"] == 1


def test_a_stream_keeps_its_speed_beside_two_clients_tokenizing_a_mebibyte():
    """Tokenizing and JSON run off the event loop: a stream beside two clients sending 1 MiB
    /tokenize bodies in a loop keeps at least 80% of its speed alone."""
    app, _ = fake_app(FakeEngine(tokens=150, interval=0.01))
    body = {"prompt": "a stream of words,  " * 52_000}  # 1,040,000 characters
    body_bytes = json.dumps(body).encode()
    assert 1_000_000 < len(body_bytes) < 1 << 20
    with uvicorn_thread(app) as port:

        def stream_seconds() -> float:
            start = time.monotonic()
            status, _, raw = request(
                port, "POST", "/v1/completions", {"prompt": "x", "stream": True}
            )
            assert status == 200 and sse_events(raw)[-1] == "[DONE]"
            return time.monotonic() - start

        alone = stream_seconds()
        done = threading.Event()
        tokenized = []

        def tokenizer_client():
            while not done.is_set():
                status, _, raw = request(port, "POST", "/tokenize", body_bytes)
                tokenized.append(status)

        clients = [threading.Thread(target=tokenizer_client) for _ in range(2)]
        for client in clients:
            client.start()
        time.sleep(0.3)
        try:
            beside = stream_seconds()
        finally:
            done.set()
            for client in clients:
                client.join(60)
    assert tokenized and set(tokenized) == {200}
    assert alone / beside >= 0.8, (
        f"alone {alone:.2f} s, beside two tokenizing clients {beside:.2f} s"
    )


# ---- a vocabulary wider than the tokenizer (nanoGPT pads 50257 ids to 50304) --------------


def test_ids_beyond_the_tokenizer_are_no_text_in_every_answer():
    """The FakeEngine's config has 50304 ids: its tokens and top logprobs are id 50300."""
    engine = FakeEngine(tokens=3, token=50300, top=((50300, -0.5), (13, -1.0)))
    app, _ = fake_app(engine)
    with uvicorn_thread(app) as port:
        bias = {"50300": 5, "50303": -5}
        for stream in (False, True):
            body = {"prompt": "x", "logprobs": 2, "logit_bias": bias, "stream": stream}
            status, _, raw = request(port, "POST", "/v1/completions", body)
            assert status == 200, raw
            if stream:
                events = sse_events(raw)
                assert events[-1] == "[DONE]" and "error" not in events[-2]
                lists = [e["choices"][0]["logprobs"] for e in events[:-1]]
                tokens = [t for lp in lists if lp for t in lp["tokens"]]
            else:
                choice = json.loads(raw)["choices"][0]
                assert choice["text"] == ""
                tokens = choice["logprobs"]["tokens"]
                assert choice["logprobs"]["top_logprobs"][0] == {"": -0.5, ".": -1.0}
            assert tokens == ["", "", ""]
        chat = {"messages": [USER], "logprobs": True, "top_logprobs": 2}
        status, _, raw = request(port, "POST", "/v1/chat/completions", chat)
        content = json.loads(raw)["choices"][0]["logprobs"]["content"]
        assert status == 200 and content[0]["bytes"] == [] and content[0]["token"] == ""
        assert content[0]["top_logprobs"][1] == {"token": ".", "logprob": -1.0, "bytes": [46]}
        status, _, raw = request(port, "POST", "/detokenize", {"tokens": [50300, 13]})
        assert status == 200 and json.loads(raw)["prompt"] == "."


def test_ids_beyond_the_tokenizer_are_never_sampled_unless_biased():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gpt2cli import sampling
    from gpt2cli.serve.programs import settings_arrays
    from gpt2cli.serve.protocol import parse_settings

    vocab, known = 50304, 50257
    logits = jnp.zeros((1, vocab)).at[0, known:].set(50.0)  # the padded ids look likeliest
    keys = jax.random.split(jax.random.key(0), 1)
    seen, counts = jnp.zeros((1, vocab), bool), jnp.zeros((1, vocab), jnp.int32)
    pick = jax.jit(sampling.pick)
    for body, allowed in (
        ({"temperature": 0}, range(known)),
        ({"temperature": 100}, range(known)),
        ({"temperature": 0, "logit_bias": {"50300": 1}}, [50300]),
    ):
        settings = parse_settings(body, vocab, seed=0, known=known)
        padded = dict(settings.logit_bias)
        assert len(padded) == vocab - known and all(t >= known for t in padded)
        rule = settings_arrays([settings], vocab).rule
        for step in range(3):
            picked = pick(logits, rule, keys, step, seen, counts)
            token = int(np.asarray(picked)[0])
            assert token in allowed, (body, token)
