"""The HTTP layer alone (uvicorn in a thread, no model loaded): auth, CORS, limits, loading,
internal errors, all in OpenAI's error shape."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette", reason="gpt2 serve needs starlette (pip install starlette)")

from gpt2cli.serve.app import create_app
from gpt2cli.serve.scheduler import Scheduler
from tests.helpers_serve import request, uvicorn_thread

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
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--grace", "-1"], "--grace must be 0 or more seconds"),
        (["--port", "70000"], "--port must be from 0 to 65535"),
        (["-m", str(tmp_path / "missing.npz")], "does not exist"),
    ):
        result = cli("serve", *args)
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
    help_text = cli("serve", "--help").output
    assert "gpt2 serve -m gpt2.npz" in help_text and "--max-queue" in help_text
