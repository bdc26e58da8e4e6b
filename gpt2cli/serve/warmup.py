"""Which programs `gpt2 serve` compiles before it answers /health, and which after.

A server that compiled every program for every block shape first would keep a user waiting
a minute or two; one that compiled nothing first would make the first request wait for its
programs. So the server compiles what a short first request needs (`first_programs`: the
smallest stage and block), says it is ready, and compiles the rest (`every_program`) in a
background thread (`Warmer`), the blocks most likely to be needed first, while requests are
served. A request needing a program not compiled yet compiles it, or waits for the thread
compiling it: that one program, never the rest.

`--warm-up all` compiles every program before /health answers 200 (nothing compiles after);
`--warm-up first` compiles the rest only when a request needs it (no background work).
"""

from __future__ import annotations

import threading

from gpt2cli.serve.programs import Program, SlotPrograms

_RANK = {"decode": 0, "prefill": 1, "insert": 2, "move": 3, "resize": 4}  # compiled first


def neighbours(sizes: list[int], now: int) -> list[int]:
    """The sizes next to `now` in the sorted `sizes`."""
    i = sizes.index(now)
    return sizes[max(i - 1, 0) : i] + sizes[i + 1 : i + 2]


def stage_lengths(p: SlotPrograms) -> list[int]:
    """Every length a prompt's stage may have."""
    return sorted({p.stage_length(n) for n in range(1, p.config.n_positions + 1)})


def first_programs(p: SlotPrograms) -> list[Program]:
    """What a short first request needs: its prompt read in the narrowest block into the
    shortest stage, then decoded alone in the shortest block."""
    stage, length = stage_lengths(p)[0], p.lengths[0]
    programs = [Program("prefill", 1, stage, width=p.widths[0])]
    if stage != length:
        programs.append(Program("resize", 1, stage, to_rows=1, to_length=length))
    return [*programs, Program("insert", 1, length), Program("decode", 1, length)]


def every_program(p: SlotPrograms, buckets: list[int]) -> list[Program]:
    """Every program the scheduler may run, smallest blocks first (the likeliest to be needed
    soon: one client, short prompts), the model's programs before the copies at each size.

    The block is resized one neighbouring bucket at a time (rows, then length), so a resize is
    compiled only between neighbours; a stage is resized to the block's length to be inserted.
    """
    programs = []
    for stage in stage_lengths(p):
        programs += [Program("prefill", 1, stage, width=w) for w in p.widths]
        programs += [
            Program("resize", 1, stage, to_rows=1, to_length=n) for n in p.lengths if n != stage
        ]
    for rows in buckets:
        for length in p.lengths:
            programs += [Program("decode", rows, length), Program("insert", rows, length)]
            if rows > 1:
                programs.append(Program("move", rows, length))
            programs += [
                Program("resize", rows, length, to_rows=r, to_length=length)
                for r in neighbours(buckets, rows)
            ]
            programs += [
                Program("resize", rows, length, to_rows=rows, to_length=n)
                for n in neighbours(p.lengths, length)
            ]
    unique = dict.fromkeys(programs)
    return sorted(unique, key=lambda q: (q.rows * q.length, _RANK[q.kind]))


class Warmer:
    """Compiles `programs` in a daemon thread, in order, one at a time, until all are compiled
    or `stop` is called (the program being compiled then ends first: XLA cannot be
    interrupted)."""

    def __init__(self, programs: SlotPrograms, plan: list[Program]):
        self.programs = programs
        self.plan = plan
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpt2-warm-up", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Programs of the plan not compiled yet."""
        return sum(not self.programs.is_compiled(q) for q in self.plan)

    def _run(self) -> None:
        for program in self.plan:
            if self._stop.is_set():
                return
            self.programs.compiled(program)
