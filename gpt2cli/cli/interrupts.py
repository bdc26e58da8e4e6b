"""Ctrl-C and SIGTERM, one way everywhere: schedulers and `docker stop` send SIGTERM.

Outside a `StopRequest`, both raise `Interrupted` (a KeyboardInterrupt), so every cleanup that
Ctrl-C runs (temp files, a chat's partial reply) runs for SIGTERM too; the CLI then exits with
128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM). Inside a `StopRequest` (a training
loop, a chat reply) the first signal only asks the work to stop at its next safe point.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; `exit_code` is what the process should end with."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def exit_code(exc: KeyboardInterrupt) -> int:
    return getattr(exc, "exit_code", 128 + signal.SIGINT)


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def install() -> None:
    """Make SIGTERM interrupt like Ctrl-C (called once by the console script)."""
    for signum in SIGNALS:
        signal.signal(signum, _raise)


class StopRequest:
    """While active, the first Ctrl-C/SIGTERM sets `signum` and calls `on_first`; a second
    one raises `Interrupted` when `second_aborts` (stop now, whatever it costs)."""

    def __init__(
        self, on_first: Callable[[int], None] | None = None, *, second_aborts: bool = False
    ) -> None:
        self.on_first, self.second_aborts = on_first, second_aborts
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def hit(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and self.second_aborts:
            raise Interrupted(signum)
        if self.signum is None:
            self.signum = signum
            if self.on_first:
                self.on_first(signum)

    def __enter__(self) -> StopRequest:
        self.signum = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
