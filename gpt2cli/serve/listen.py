"""uvicorn, as `gpt2 serve` runs it: the socket bound before the model loads, a time limit on
a client's request, and a shutdown that ends every request in OpenAI's shape.

- `bind`: a port in use is one error line at start, not uvicorn's exit after compiling.
- `timed_h11`: uvicorn closes idle keep-alive connections, but a connection that never sends
  (or never finishes) its request stayed open for ever; this one is closed after a limit.
- `Server`: SIGTERM or Ctrl-C stops accepting; requests may finish for `grace` seconds; then,
  or at a second signal, `end_requests` ends what is left (a 503 `shutting_down`, or an error
  event and [DONE]) and the server stops: no request is cut by a cancelled task.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gpt2cli.errors import UserError

ANSWER_S = 1.0  # after the requests are ended, how long their answers may take to be written


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or a UserError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server? pick "
            "another --port)"
        ) from None
    return sock


def timed_h11(request_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request (headers and body) has not
    all arrived `request_timeout` seconds after the connection opened or its last response."""

    class TimedH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._start_clock()

        def on_response_complete(self) -> None:
            self._start_clock()  # before uvicorn reads a pipelined request
            super().on_response_complete()

        def _start_clock(self) -> None:
            waiting_after = self.cycle  # the request before the one the clock is for
            self.loop.call_later(request_timeout, self._time_up, waiting_after)

        def _time_up(self, waiting_after) -> None:
            cycle = self.cycle
            arrived = cycle is not None and cycle is not waiting_after and not cycle.more_body
            if not arrived and not self.transport.is_closing():
                self.transport.close()  # a request half read sees a disconnect: a 499

    return TimedH11


class Server(uvicorn.Server):
    """uvicorn's server with `gpt2 serve`'s ending (see the module's note). A shutdown that
    ended cleanly exits 0: uvicorn would re-raise the signal after it."""

    def __init__(
        self,
        config: uvicorn.Config,
        grace: float,
        end_requests: Callable[[], None],
        on_signal: Callable[[], None] = lambda: None,
    ):
        super().__init__(config)
        self.grace = grace
        self.end_requests = end_requests  # run on the event loop
        self.on_signal = on_signal  # run in the signal handler, before anything else
        self.hurry = False  # a second signal: end the requests now

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # a test runs the server in a thread: it stops it by setting should_exit
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        self.on_signal()
        if self.should_exit:
            self.hurry = True
        else:
            self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        ending = asyncio.create_task(self._end_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()

    async def _end_after_grace(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        while loop.time() < deadline and not self.hurry:
            await asyncio.sleep(0.05)
        self.end_requests()
        deadline = loop.time() + ANSWER_S
        while self.server_state.tasks and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.force_exit = True  # stop waiting for connections; nothing is left to answer
