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


class FakeEngine:
    """A `Scheduler` stand-in for app tests without a model: the bundled tokenizer, a config of
    `vocab` ids, and a thread per choice that sends `tokens` deltas of `token` (" hi" unless
    given) on a clock of `interval` seconds (a device decoding on its own), then a finish. With `max_queue=0` every request that
    passes validation gets a 503 queue_full; with `hang=True` no job ever gets an event."""

    def __init__(self, *, tokens=8, interval=0.0, token=None, top=(), max_queue=64, hang=False):
        from types import SimpleNamespace

        from gpt2cli.serve.prefix_cache import PrefixCache
        from gpt2cli.tokenizer import bundled

        self.tokenizer = bundled()
        self.prefix = PrefixCache(0)  # /metrics reads it
        self.programs = SimpleNamespace(
            config=SimpleNamespace(n_positions=128, vocab_size=50304, eos_token_id=50256)
        )
        self.ready = threading.Event()
        self.ready.set()
        self.load_error = None
        self.metrics = None
        self.max_batch, self.max_queue = 4, max_queue
        self.queue_length = self.busy_rows = self.block_rows = self.block_length = 0
        self.programs_compiled = self.programs_waiting = 0
        self.tokens, self.interval, self.hang = tokens, interval, hang
        self.token = self.tokenizer.encode(" hi")[0] if token is None else token
        self.top = top
        self.submitted: list = []

    def submit(self, jobs) -> None:
        from gpt2cli.serve.scheduler import QueueFull

        if len(jobs) > self.max_queue:
            raise QueueFull("the server is busy: the request queue is full, retry shortly")
        self.submitted += jobs
        if not self.hang:
            for job in jobs:
                threading.Thread(target=self._run, args=(job,), daemon=True).start()

    def cancel(self, jobs) -> None:
        for job in jobs:
            job.cancelled = True

    def _run(self, job) -> None:
        from gpt2cli.serve.scheduler import Delta, Finish, TokenInfo

        start = time.monotonic()
        for i in range(self.tokens):
            if job.cancelled:
                return
            time.sleep(max(start + (i + 1) * self.interval - time.monotonic(), 0))
            info = TokenInfo(self.token, -1.0, self.top)
            text = self.tokenizer.decode([self.token]) if self.token < 50257 else ""
            job.sink(Delta(text, (info,)))
        job.sink(Finish("length", self.tokens))


def fake_app(engine: FakeEngine | None = None, **kwargs):
    """The app over a `FakeEngine` (served id "m")."""
    from gpt2cli.serve.app import create_app

    engine = engine or FakeEngine()
    return create_app(engine, model_name="m", **kwargs), engine
