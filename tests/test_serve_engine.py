"""The serving engine thread alone (no HTTP): continuous batching gives every request the
tokens `gpt2 generate` gives it, alone or batched; a cancelled request frees its row."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from gpt2cli.engine import Engine, SamplingParams
from gpt2cli.generate import generate
from gpt2cli.serve.programs import SlotPrograms, length_buckets
from gpt2cli.serve.protocol import Settings
from gpt2cli.serve.scheduler import (
    QUEUE_FULL,
    Delta,
    Failed,
    Finish,
    Job,
    QueueFull,
    Scheduler,
    row_buckets,
)
from gpt2cli.tokenizer import bundled

PROMPTS = [
    "Hello there, my friend",
    "The quick brown fox",
    "Once upon a time in a land far away, there lived a king who " * 4,  # > one prefill chunk
    "A",
]
SAMPLINGS = [
    SamplingParams(),
    SamplingParams(temperature=0.9, seed=3),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=5),
    SamplingParams(temperature=0.7, min_p=0.05, repetition_penalty=1.3, seed=7),
]


def make_job(prompt, max_tokens, sp: SamplingParams, stop=()) -> Job:
    """A choice of `max_tokens` tokens sampled as `sp` says, its events gathered by a
    `Collector`."""
    return Job(
        prompt=prompt,
        max_tokens=max_tokens,
        settings=Settings(sampling=sp),
        sample=0,
        stop=stop,
        sink=Collector(),
    )


class Collector:
    """A job's sink: gathers its events, signals when it ends."""

    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, Finish | Failed):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))


@pytest.fixture(scope="module")
def tok():
    return bundled()


@pytest.fixture(scope="module")
def scheduler(tiny_a, tok):
    config, params = tiny_a

    def load():
        one, many = Engine(config, params, batch=1), Engine(config, params, batch=8)
        return SlotPrograms(one, many, chunk=4, prefill_chunk=48), tok

    s = Scheduler(load, max_batch=4, max_queue=6)
    s.start()
    assert s.ready.wait(300) and s.load_error is None
    yield s
    s.stop()


def run(scheduler, tok, specs, max_tokens=24):
    jobs = [make_job(tok.encode(prompt), max_tokens, sp) for prompt, sp in specs]
    scheduler.submit(jobs)
    for job in jobs:
        assert job.sink.done.wait(120)
    return jobs


def test_row_buckets():
    assert row_buckets(1) == [1]
    assert row_buckets(8) == [1, 2, 4, 8]
    assert row_buckets(6) == [1, 2, 4, 6]


def test_length_buckets():
    assert length_buckets(1152) == [64, 128, 192, 256, 512, 1152]  # GPT-2: 1024 + a chunk
    assert length_buckets(176) == [64, 128, 176]
    assert length_buckets(40) == [40]


def test_batched_equals_alone_equals_generate(scheduler, tok, tiny_a):
    """Greedy and seeded requests (a prompt read in a 48 then a 32 wide chunk among them) give the
    same tokens together, one by one, and through `generate` (the `gpt2 generate` path)."""
    specs = list(zip(PROMPTS, SAMPLINGS, strict=True))
    together = [job.sink.text for job in run(scheduler, tok, specs)]
    alone = [run(scheduler, tok, [spec])[0].sink.text for spec in specs]
    engine = Engine(*tiny_a, batch=1)
    reference = [
        generate(engine, tok, tok.encode(p), max_new_tokens=24, sampling=sp).text for p, sp in specs
    ]
    assert together == alone == reference
    assert len(set(reference)) == 4
    assert scheduler.programs.traces == scheduler.compiled_traces  # all compiled at start


def test_rows_growing_past_cache_lengths_keep_their_tokens(scheduler, tok, tiny_a, monkeypatch):
    """The block's cache grows through every length bucket while a long request decodes beside
    a short one, and shrinks when the long one leaves: both still give `generate`'s tokens."""
    lengths = scheduler.programs.lengths
    assert len(lengths) >= 3
    long, short = (PROMPTS[3], SAMPLINGS[0]), (PROMPTS[0], SAMPLINGS[1])
    long_tokens = tiny_a[0].n_positions - len(tok.encode(PROMPTS[3]))  # the whole window
    seen_lengths = set()
    decode = scheduler.programs.decode

    def watched(params, slots, *args, **kwargs):  # the block length of every decode chunk
        seen_lengths.add(slots.cache.length)
        return decode(params, slots, *args, **kwargs)

    monkeypatch.setattr(scheduler.programs, "decode", watched)
    jobs = [make_job(tok.encode(p), n, sp) for (p, sp), n in ((long, long_tokens), (short, 24))]
    scheduler.submit(jobs)
    for job in jobs:
        assert job.sink.done.wait(120)
    engine = Engine(*tiny_a, batch=1)
    for job, ((prompt, sp), n) in zip(jobs, ((long, long_tokens), (short, 24)), strict=True):
        want = generate(engine, tok, tok.encode(prompt), max_new_tokens=n, sampling=sp).text
        assert job.sink.text == want
    assert seen_lengths >= set(lengths)  # every length was used, the last one included
    end = time.monotonic() + 10  # the engine thread resizes the block in its next round
    while scheduler.block_length != lengths[0] and time.monotonic() < end:
        time.sleep(0.01)
    assert scheduler.block_length == lengths[0]  # the block shrank back once idle
    assert scheduler.programs.traces == scheduler.compiled_traces


def test_stop_string_frees_the_row_and_is_never_shown(scheduler, tok):
    (job,) = run(scheduler, tok, [(PROMPTS[0], SAMPLINGS[0])])
    full = job.sink.text
    stop = full[5:9]
    stopped = make_job(tok.encode(PROMPTS[0]), 24, SAMPLINGS[0], stop=(stop,))
    scheduler.submit([stopped])
    assert stopped.sink.done.wait(60)
    assert stopped.sink.text == full[: full.index(stop)]
    assert stopped.sink.events[-1].reason == "stop"
    assert scheduler.busy_rows == 0


def test_cancel_frees_the_row(scheduler, tok):
    long = make_job(tok.encode(PROMPTS[1]), 100, replace(SAMPLINGS[1], seed=1))
    scheduler.submit([long])
    while not long.sink.events:  # it is decoding
        threading.Event().wait(0.01)
    scheduler.cancel([long])
    (after,) = run(scheduler, tok, [(PROMPTS[0], SAMPLINGS[0])], max_tokens=4)
    assert after.sink.events[-1].reason == "length"
    assert long.sink.events and not long.sink.done.is_set()  # no more output once cancelled
    assert scheduler.busy_rows == 0


def test_queue_full_is_refused_whole(scheduler, tok):
    jobs = [make_job([1, 2], 4, SamplingParams()) for _ in range(7)]
    with pytest.raises(QueueFull):
        scheduler.submit(jobs)
    assert scheduler.queue_length == 0


def test_a_choice_waiting_past_the_queue_timeout_gets_503(scheduler, tok, monkeypatch):
    """--queue-timeout: with every row busy, a waiting choice is refused once it has waited
    longer than the timeout (0 here: at the engine's next round); the busy rows go on."""
    monkeypatch.setattr(scheduler, "queue_timeout", 0.0)
    busy = [make_job(tok.encode(PROMPTS[1]), 100, SAMPLINGS[0]) for _ in range(scheduler.max_batch)]
    scheduler.submit(busy)
    while scheduler.queue_length:  # every busy job has a row
        time.sleep(0.005)
    late = make_job(tok.encode(PROMPTS[0]), 4, SAMPLINGS[0])
    scheduler.submit([late])
    assert late.sink.done.wait(30)
    assert late.sink.events == [Failed(503, QUEUE_FULL)]
    for job in busy:
        assert job.sink.done.wait(120)
        assert job.sink.events[-1] == Finish("length", 100)
