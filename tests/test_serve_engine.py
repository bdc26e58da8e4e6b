"""The serving engine thread alone (no HTTP): continuous batching gives every request the
tokens `gpt2 generate` gives it, alone or batched, with its prompt read whole or partly taken
from the prefix cache; a cancelled request frees its row."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import jax
import pytest

from gpt2cli.engine import Engine, SamplingParams
from gpt2cli.generate import generate
from gpt2cli.serve.prefix_cache import PrefixCache
from gpt2cli.serve.programs import Program, SlotPrograms, length_buckets
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
from gpt2cli.serve.warmup import every_program, first_programs
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


PREFIX_BYTES = 1 << 20  # ~20 entries of tiny-a's longest rows


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

    s = Scheduler(load, max_batch=4, max_queue=6, prefix_cache_bytes=PREFIX_BYTES, warm_up="all")
    s.start()
    assert s.ready.wait(300) and s.load_error is None
    s.compiled_at_start = dict(s.programs.compiles)
    yield s
    s.stop()


def nothing_compiled_since_start(s: Scheduler) -> bool:
    """`--warm-up all`: every program was compiled once, before `ready`, none since."""
    return s.programs.compiles == s.compiled_at_start and set(s.compiled_at_start.values()) == {1}


def run(scheduler, tok, specs, max_tokens=24):
    jobs = [make_job(tok.encode(prompt), max_tokens, sp) for prompt, sp in specs]
    scheduler.submit(jobs)
    for job in jobs:
        assert job.sink.done.wait(120)
    idle(scheduler)
    return jobs


def idle(scheduler) -> None:
    """Wait for the engine thread to free the finished rows (and keep them in the prefix cache):
    it does so just after sending their last event."""
    end = time.monotonic() + 10
    while scheduler.busy_rows and time.monotonic() < end:
        time.sleep(0.005)


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
    scheduler.prefix.clear()
    together = [job.sink.text for job in run(scheduler, tok, specs)]
    alone_jobs = [run(scheduler, tok, [spec])[0] for spec in specs]  # the prefix cache warm
    alone = [job.sink.text for job in alone_jobs]
    prompts = [tok.encode(p) for p in PROMPTS]
    assert [job.reused for job in alone_jobs] == [len(p) - 1 for p in prompts]
    assert alone_jobs[0].sink.events[-1].cached_tokens == len(prompts[0]) - 1
    engine = Engine(*tiny_a, batch=1)
    reference = [
        generate(engine, tok, tok.encode(p), max_new_tokens=24, sampling=sp).text for p, sp in specs
    ]
    assert together == alone == reference
    assert len(set(reference)) == 4
    assert nothing_compiled_since_start(scheduler)


def test_rows_growing_past_cache_lengths_keep_their_tokens(scheduler, tok, tiny_a, monkeypatch):
    """The block's cache grows through every length bucket while a long request decodes beside
    a short one, and shrinks when the long one leaves: both still give `generate`'s tokens."""
    lengths = scheduler.programs.lengths
    assert len(lengths) >= 3
    long, short = (PROMPTS[3], SAMPLINGS[0]), (PROMPTS[0], SAMPLINGS[1])
    long_tokens = tiny_a[0].n_positions - len(tok.encode(PROMPTS[3]))  # the whole window
    seen_lengths = set()
    decode = scheduler.programs.decode

    def watched(slots, settings):  # the block length of every decode chunk
        seen_lengths.add(slots.cache.length)
        return decode(slots, settings)

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
    assert nothing_compiled_since_start(scheduler)


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
        assert job.sink.events[-1].reason == "length"
        assert job.sink.events[-1].completion_tokens == 100


def test_a_prompt_extending_a_kept_one_reads_only_the_rest(scheduler, tok, tiny_a):
    """A chat's next turn: the prompt is the last prompt, its reply and a new message. It starts
    from the kept row (prompt and reply), and gives `generate`'s tokens for the whole prompt."""
    scheduler.prefix.clear()
    first = tok.encode(PROMPTS[0])
    (turn,) = run(scheduler, tok, [(PROMPTS[0], SAMPLINGS[0])], max_tokens=12)
    follow = first + turn.made + tok.encode(" And then?")
    job = make_job(follow, 12, SAMPLINGS[1])
    scheduler.submit([job])
    assert job.sink.done.wait(60)
    idle(scheduler)
    assert job.reused == len(first) + len(turn.made) - 1  # the reply's last token was never fed
    engine = Engine(*tiny_a, batch=1)
    want = generate(engine, tok, follow, max_new_tokens=12, sampling=SAMPLINGS[1]).text
    assert job.sink.text == want
    assert scheduler.prefix.entries == 1  # the longer row replaced the one it extends


def test_prefix_cache_off_reads_every_prompt(scheduler, tok, monkeypatch):
    """--prefix-cache-mb 0: nothing is kept, every prompt is read whole, the tokens are the
    same as with the cache."""
    spec = (PROMPTS[1], SAMPLINGS[2])
    scheduler.prefix.clear()
    warm = [run(scheduler, tok, [spec])[0] for _ in range(2)]
    monkeypatch.setattr(scheduler, "prefix", PrefixCache(0))
    cold = [run(scheduler, tok, [spec])[0] for _ in range(2)]
    assert warm[1].reused > 0 and [job.reused for job in cold] == [0, 0]
    assert {job.sink.text for job in warm + cold} == {warm[0].sink.text}
    assert scheduler.prefix.entries == 0 and scheduler.prefix.nbytes == 0


def test_a_tiny_budget_evicts_the_oldest_and_frees_it(scheduler, tok, monkeypatch):
    """A budget of one entry: the second prompt's row evicts the first's, whose buffers are
    freed; the cache never holds more than its budget."""
    one = scheduler._entry_bytes(scheduler.programs.lengths[0])
    monkeypatch.setattr(scheduler, "prefix", PrefixCache(one, release=scheduler.prefix.release))
    run(scheduler, tok, [(PROMPTS[0], SAMPLINGS[0])], max_tokens=4)
    (kept,) = [entry.value for entry in scheduler.prefix._entries.values()]
    run(scheduler, tok, [(PROMPTS[1], SAMPLINGS[0])], max_tokens=4)
    assert scheduler.prefix.entries == 1 and scheduler.prefix.nbytes == one
    assert all(a.is_deleted() for a in jax.tree_util.tree_leaves(kept))
    (again,) = run(scheduler, tok, [(PROMPTS[0], SAMPLINGS[0])], max_tokens=4)
    assert again.reused == 0  # evicted: read whole


def test_a_prompt_cancelled_mid_prefill_keeps_what_was_read(scheduler, tok, tiny_a, monkeypatch):
    """A long prompt cancelled after its first prefill chunk: the chunk read is kept, and the
    same prompt sent again starts from it and still gives `generate`'s tokens."""
    scheduler.prefix.clear()
    prompt = tok.encode(PROMPTS[2])
    chunk = scheduler.programs.prefill_chunk
    assert len(prompt) > chunk
    job = make_job(prompt, 8, SAMPLINGS[3])
    read = scheduler.programs.prefill_stage

    def cancelling(*args):  # the job is cancelled as its first chunk is read
        scheduler.cancel([job])
        return read(*args)

    monkeypatch.setattr(scheduler.programs, "prefill_stage", cancelling)
    scheduler.submit([job])
    end = time.monotonic() + 60
    while not scheduler.prefix.entries and time.monotonic() < end:
        time.sleep(0.01)
    assert scheduler.busy_rows == 0
    monkeypatch.setattr(scheduler.programs, "prefill_stage", read)
    assert not job.sink.events and job.prefilled == chunk
    (entry,) = scheduler.prefix._entries.values()
    assert entry.tokens.tolist() == prompt[:chunk]
    retry = make_job(prompt, 8, SAMPLINGS[3])
    scheduler.submit([retry])
    assert retry.sink.done.wait(60)
    assert retry.reused == chunk
    engine = Engine(*tiny_a, batch=1)
    want = generate(engine, tok, prompt, max_new_tokens=8, sampling=SAMPLINGS[3]).text
    assert retry.sink.text == want


def start(tiny_a, tok, warm_up: str, max_batch: int) -> Scheduler:
    config, params = tiny_a

    def load():
        one, many = Engine(config, params, batch=1), Engine(config, params, batch=max_batch)
        return SlotPrograms(one, many, chunk=4, prefill_chunk=48), tok

    s = Scheduler(load, max_batch=max_batch, max_queue=6, warm_up=warm_up)
    s.start()
    assert s.ready.wait(300) and s.load_error is None
    return s


def model_programs(s: Scheduler) -> int:
    return sum(q.kind in ("prefill", "decode") for q in s.programs.compiles)


def test_warm_up_all_compiles_every_program_once_before_ready(scheduler):
    assert set(scheduler.compiled_at_start) == set(every_program(scheduler.programs, [1, 2, 4]))
    assert set(scheduler.compiled_at_start.values()) == {1}
    assert scheduler.programs_waiting == 0


def test_a_request_needing_uncompiled_programs_waits_for_them_alone(tok, tiny_a):
    """--warm-up first: ready once a short request's programs are compiled; a long prompt and
    a second row need more (a wider prefill, a longer stage, a two-row block): they are
    compiled when needed, once, and the answers are `generate`'s (twice: no program is ever
    compiled or traced again)."""
    s = start(tiny_a, tok, "first", max_batch=2)
    try:
        assert set(s.programs.compiles) == set(first_programs(s.programs))
        assert s.programs_waiting == 0  # nothing compiles in the background
        specs = [(PROMPTS[2], SAMPLINGS[0]), (PROMPTS[0], SAMPLINGS[1])]
        engine = Engine(*tiny_a, batch=1)
        want = [
            generate(engine, tok, tok.encode(p), max_new_tokens=24, sampling=sp).text
            for p, sp in specs
        ]
        assert [job.sink.text for job in run(s, tok, specs)] == want
        compiled = dict(s.programs.compiles)
        assert any(q.kind == "decode" and q.rows == 2 for q in compiled)  # both rows at once
        stage = s.programs.stage_length(len(tok.encode(PROMPTS[2])))
        assert Program("prefill", 1, stage, width=48) in compiled
        assert [job.sink.text for job in run(s, tok, specs)] == want
        assert set(s.programs.compiles.values()) == {1}
        assert set(s.programs.compiles) <= set(every_program(s.programs, s.buckets))
        assert s.programs.traces == model_programs(s)
    finally:
        s.stop()


def test_background_warm_up_serves_at_once_and_compiles_each_program_once(tok, tiny_a):
    """The default: a request sent as soon as the scheduler is ready is answered while the rest
    compiles in the background, which ends with every program compiled exactly once."""
    s = start(tiny_a, tok, "background", max_batch=2)
    try:
        plan = every_program(s.programs, s.buckets)
        assert s.programs_waiting > 0  # still compiling
        (job,) = run(s, tok, [(PROMPTS[0], SAMPLINGS[0])])
        engine = Engine(*tiny_a, batch=1)
        want = generate(engine, tok, tok.encode(PROMPTS[0]), max_new_tokens=24).text
        assert job.sink.text == want
        end = time.monotonic() + 300
        while s.warmer.running and time.monotonic() < end:
            time.sleep(0.1)
        assert s.programs_waiting == 0 and set(s.programs.compiles) == set(plan)
        assert set(s.programs.compiles.values()) == {1}
        assert s.programs.traces == model_programs(s)
    finally:
        s.stop()


def test_stop_while_compiling_returns_promptly(tok, tiny_a):
    """A stop during the background compiles ends the scheduler after the program being
    compiled."""
    s = start(tiny_a, tok, "background", max_batch=4)
    assert s.programs_waiting > 0
    began = time.monotonic()
    s.stop(timeout=10)
    assert time.monotonic() - began < 10
    assert not s.running and s.programs_waiting > 0
