"""Start `gpt2 serve` (a subprocess, or uvicorn in a thread) on a free 127.0.0.1 port and talk
to it with raw HTTP. Every server started here is stopped by its fixture."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager

import pytest

from tests.conftest import TINY_A, gpt2_exe

# gpt2 serve's web stack; a GPU machine running the checkout may lack it (pip install it there)
pytest.importorskip("starlette", reason="gpt2 serve needs starlette (pip install starlette)")
pytest.importorskip("uvicorn", reason="gpt2 serve needs uvicorn (pip install uvicorn)")

HOST = "127.0.0.1"
SERVE_KEY = "test-key"  # the API key of the shared `serve_tiny` server (conftest.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`gpt2 serve -m tiny-a ...` in a subprocess; `health_seen` lists /health codes polled."""

    def __init__(self, *args: str, model=TINY_A):
        self.port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPT2_NO_COMPILE_CACHE": "1"}
        self.proc = subprocess.Popen(
            [gpt2_exe(), "serve", "-m", str(model), "--port", str(self.port), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.health_seen: list[int] = []
        self._stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait_ready(self, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"server exited:\n{self.stderr}"
            try:
                status, _, _ = request(self.port, "GET", "/health")
            except OSError:
                time.sleep(0.2)
                continue
            self.health_seen.append(status)
            if status == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.stderr}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@contextmanager
def uvicorn_thread(app):
    """Serve an ASGI app from a thread (no signal handlers); stop it on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started and time.monotonic() < end:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def request(port: int, method: str, path: str, body=None, headers: dict | None = None, timeout=120):
    """(status, headers, body bytes) of one request; a dict body is sent as JSON."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict | list) else body
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post_json(port: int, path: str, body, headers: dict | None = None):
    status, hdrs, data = request(port, "POST", path, body, headers)
    return status, hdrs, json.loads(data) if data else None


def sse_events(raw: bytes) -> list:
    """The `data:` payloads of an event stream, JSON-decoded except the final [DONE]."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric(port: int, name: str, headers: dict | None = None) -> float:
    _, _, text = request(port, "GET", "/metrics", headers=headers)
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")
