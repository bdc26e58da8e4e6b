"""Cached generation against the HF golden continuations, and the generation API's promises."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2cli.errors import UserError
from gpt2cli.generate import (
    Engine,
    PromptCache,
    SamplingParams,
    StopFilter,
    TokenRun,
    batch_generate,
    fit_prompt,
    generate,
    stream_generate,
)
from gpt2cli.model import GPT2, KVCache
from gpt2cli.tokenizer import bundled

MARGIN = 1e-3  # below this top1-top2 gap, float32 vs float64 may pick either token
BF16_TIE = 0.05  # the same for bfloat16 compute (tiny-a's bfloat16 logits are within 0.02)


@pytest.fixture(scope="module")
def tok():
    return bundled()


@pytest.fixture(scope="module")
def engine_a(tiny_a):
    return Engine(*tiny_a)


@pytest.fixture(scope="module")
def engine_b(tiny_b):
    return Engine(*tiny_b)


def greedy_tokens(engine, prompt, n):
    run = TokenRun(engine, [prompt], max_new_tokens=n, sampling_params=SamplingParams())
    return [int(column[0]) for column in run]


def check_continuation(ours, reference, margins, tie=MARGIN):
    """Equal token for token until the first step where HF's own choice was a near tie."""
    for step, (mine, theirs) in enumerate(zip(ours, reference, strict=True)):
        if margins[step] < tie:
            return
        assert mine == theirs, f"step {step}: {mine} != {theirs} (margin {margins[step]:.4f})"


@pytest.mark.parametrize("i", [0, 1, 2])
def test_greedy_continuation_matches_hf_tiny_a(engine_a, golden, i):
    arrays = golden["arrays"]
    prompt = arrays[f"tiny_a/gen{i}/prompt_ids"].tolist()
    reference = arrays[f"tiny_a/gen{i}/tokens"].tolist()
    ours = greedy_tokens(engine_a, prompt, len(reference))
    check_continuation(ours, reference, arrays[f"tiny_a/gen{i}/margin"])


@pytest.mark.parametrize("i", [0, 1, 2])
def test_greedy_continuation_matches_hf_tiny_b(engine_b, golden, i):
    arrays = golden["arrays"]
    prompt = arrays[f"tiny_b/gen{i}/prompt_ids"].tolist()
    reference = arrays[f"tiny_b/gen{i}/tokens"].tolist()
    top2 = np.sort(arrays[f"tiny_b/gen{i}/step_logits"], axis=-1)[:, -2:]
    ours = greedy_tokens(engine_b, prompt, len(reference))
    check_continuation(ours, reference, top2[:, 1] - top2[:, 0])


def test_cached_step_logits_match_hf_and_the_full_forward(tiny_b, golden):
    """Prefill the prompt into a cache, then feed HF's continuation one token per call."""
    config, params = tiny_b
    arrays = golden["arrays"]
    prompt = arrays["tiny_b/gen2/prompt_ids"].tolist()
    tokens = arrays["tiny_b/gen2/tokens"].tolist()
    reference = arrays["tiny_b/gen2/step_logits"]  # [20, V]
    model = GPT2(config)

    @jax.jit
    def apply(ids, positions, cache):
        return model.apply({"params": params}, ids, positions, cache=cache)

    cache = KVCache.empty(config, 1, 64)
    logits, cache = apply(jnp.asarray([prompt]), None, cache)
    steps = [logits[0, -1]]
    for position, token in enumerate(tokens[:-1], start=len(prompt)):
        logits, cache = apply(jnp.asarray([[token]]), jnp.asarray([[position]]), cache)
        steps.append(logits[0, 0])
    cached = np.stack(steps)
    full, _ = model.apply({"params": params}, jnp.asarray([prompt + tokens[:-1]]))
    full = np.asarray(full[0, len(prompt) - 1 :])
    np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)
    np.testing.assert_allclose(cached, reference, atol=1e-4, rtol=0)


def test_prompt_lengths_in_one_bucket_do_not_retrace(engine_a):
    greedy_tokens(engine_a, [1, 2, 3], 6)
    traced = engine_a.programs.traces
    greedy_tokens(engine_a, [4, 5, 6, 7, 8, 9, 10], 9)
    greedy_tokens(engine_a, [11], 20)
    assert engine_a.programs.traces == traced


def test_batched_prompts_equal_the_same_prompts_alone(engine_a, tok):
    prompts = [tok.encode("Hello, world"), tok.encode("The capital of France is Paris and")]
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=4)):
        batch = batch_generate(engine_a, tok, prompts, max_new_tokens=12, sampling=params)
        alone = [generate(engine_a, tok, p, max_new_tokens=12, sampling=params) for p in prompts]
        assert [c.tokens for c in batch] == [c.tokens for c in alone]


@pytest.fixture(scope="module")
def whole_a(tiny_a):
    """An engine that decodes a run nobody streams in one call, as on a GPU (a CPU's engine
    decodes it in chunks of 4)."""
    engine = Engine(*tiny_a)
    engine.whole_runs = True
    return engine


def test_a_run_not_streamed_is_one_decode_call_with_transformers_tokens(
    whole_a, engine_a, tok, golden, monkeypatch
):
    calls = []
    for name in ("decode", "decode_run"):
        real = getattr(whole_a.programs, name)
        spy = lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)  # noqa: E731
        monkeypatch.setattr(whole_a.programs, name, spy)
    arrays = golden["arrays"]
    for i in range(3):
        prompt = arrays[f"tiny_a/gen{i}/prompt_ids"].tolist()
        reference = arrays[f"tiny_a/gen{i}/tokens"].tolist()
        calls.clear()
        ours = generate(whole_a, tok, prompt, max_new_tokens=len(reference)).tokens
        assert calls == ["decode_run"]
        check_continuation(ours, reference, arrays[f"tiny_a/gen{i}/margin"])
        calls.clear()
        assert ours == greedy_tokens(engine_a, prompt, len(reference))  # the chunked run's
        assert set(calls) == {"decode"}  # streamed: chunks


def test_whole_runs_sample_as_chunks_do_and_share_a_program_per_length_bucket(
    whole_a, engine_a, tok
):
    prompts = [tok.encode("Hello, world"), tok.encode("The capital of France is Paris and")]
    params = SamplingParams(temperature=1.0, seed=3)
    traces = []
    for n in (30, 25):  # 29 and 24 tokens after the first: one bucket (32), one program
        whole = batch_generate(whole_a, tok, prompts, max_new_tokens=n, sampling=params)
        chunked = batch_generate(engine_a, tok, prompts, max_new_tokens=n, sampling=params)
        assert [c.tokens for c in whole] == [c.tokens for c in chunked]
        assert [len(c.tokens) for c in whole] == [n, n]
        traces.append(whole_a.programs.traces)
    assert traces[1] == traces[0]
    cache = PromptCache()
    first = generate(whole_a, tok, prompts[1], max_new_tokens=20, prompt_cache=cache)
    follow = prompts[1] + first.tokens + tok.encode(" and")
    continued = generate(whole_a, tok, follow, max_new_tokens=20, prompt_cache=cache)
    assert continued.tokens == generate(engine_a, tok, follow, max_new_tokens=20).tokens


def test_a_whole_run_stalls_once_per_chunk_not_per_token(whole_a):
    """XLA:GPU reads a loop's condition back to the host after every iteration unless the
    loop's trip count is known. The whole run's count is data, so its steps run in an inner
    loop of one chunk (a known trip count) inside a loop over chunks."""
    from gpt2cli.engine import DecodeState

    state = DecodeState(
        cache=whole_a.new_cache(1, 64),
        token=jnp.zeros((1,), jnp.int32),
        position=jnp.zeros((1,), jnp.int32),
        seen=None,
        keys=jax.vmap(jax.random.key)(jnp.zeros((1,), jnp.uint32)),
        step=jnp.zeros((), jnp.int32),
    )
    compiled = whole_a.programs.decode_run.lower(
        whole_a.params, state, np.int32(5), rule=SamplingParams().rule, length=32
    ).compile()
    loops = re.findall(r" while\(.*", compiled.as_text())
    trips = sorted(
        int(m.group(1)) if (m := re.search(r'"known_trip_count":\{"n":"(\d+)"', w)) else 0
        for w in loops
    )
    assert trips == [0, whole_a.chunk]  # chunks: as many as the count needs; steps: one chunk


def test_same_seed_same_text_other_seed_other_text(engine_a, tok):
    prompt = tok.encode("Once upon a time")

    def sample(seed):
        params = SamplingParams(temperature=1.0, seed=seed)
        return generate(engine_a, tok, prompt, max_new_tokens=10, sampling=params).text

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_samples_of_one_prompt_differ_and_the_first_equals_the_single_run(engine_a, tok):
    prompt = tok.encode("Once upon a time")
    params = SamplingParams(temperature=1.0, seed=5)
    samples = batch_generate(
        engine_a, tok, [prompt], num_samples=2, max_new_tokens=8, sampling=params
    )
    single = generate(engine_a, tok, prompt, max_new_tokens=8, sampling=params)
    assert samples[0].tokens == single.tokens
    assert samples[0].tokens != samples[1].tokens


def test_streamed_pieces_join_to_the_decoded_text(engine_a, tok):
    prompt = tok.encode("Hello, world")
    responses = list(stream_generate(engine_a, tok, prompt, max_new_tokens=15))
    text = "".join(r.text for r in responses)
    assert text == tok.decode([r.token for r in responses])
    assert [r.finish_reason for r in responses] == [None] * 14 + ["length"]
    last = responses[-1]
    assert (last.prompt_tokens, last.prefilled_tokens, last.generated_tokens) == (3, 3, 15)


def test_stop_string_across_tokens_ends_the_text_before_it(engine_a, tok):
    prompt = tok.encode("Hello, world")
    full = generate(engine_a, tok, prompt, max_new_tokens=15)  # " Ur Ur Ur ..." per golden
    stop = full.text[2:6]  # starts inside one token and ends inside a later one
    stopped = generate(engine_a, tok, prompt, max_new_tokens=15, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]


def test_stop_filter_holds_back_a_possible_stop_and_releases_it():
    stops = StopFilter(["\n\nUser:"])
    assert stops.push("Hi\n") == ("Hi", False)
    assert stops.push("\nUs") == ("", False)
    assert stops.push("ual") == ("\n\nUsual", False)
    assert stops.push("\n\nUser: x") == ("", True)


def test_prompt_cache_prefills_only_the_new_suffix(engine_a, tok):
    cache = PromptCache()
    first_prompt = tok.encode("The capital of France is")
    first = generate(engine_a, tok, first_prompt, max_new_tokens=6, prompt_cache=cache)
    assert cache.tokens == first_prompt + first.tokens[:-1]
    follow = first_prompt + first.tokens + tok.encode(" and then")
    continued = generate(engine_a, tok, follow, max_new_tokens=8, prompt_cache=cache)
    assert continued.prefilled_tokens == len(follow) - len(first_prompt) - 5
    fresh = generate(engine_a, tok, follow, max_new_tokens=8)
    assert continued.tokens == fresh.tokens
    other = tok.encode("Something else entirely")  # shares no prefix: rebuilt
    rebuilt = generate(engine_a, tok, other, max_new_tokens=4, prompt_cache=cache)
    assert rebuilt.prefilled_tokens == len(other)
    assert rebuilt.tokens == generate(engine_a, tok, other, max_new_tokens=4).tokens


def test_prompt_cache_grows_past_its_first_length(engine_a, tok):
    cache = PromptCache()
    prompt = tok.encode("Hello, world")
    text = generate(engine_a, tok, prompt, max_new_tokens=100, prompt_cache=cache)
    longer = prompt + text.tokens
    grown = generate(engine_a, tok, longer, max_new_tokens=20, prompt_cache=cache)
    assert grown.prefilled_tokens == 1
    assert grown.tokens == generate(engine_a, tok, longer, max_new_tokens=20).tokens


def test_cache_lengths_are_whole_blocks_of_the_backends_size(tiny_a, tok):
    """A GPU sizes caches in blocks of 128 slots (decoding many rows, reading the cache is most
    of a step), a CPU in blocks of 256 (fewer programs to compile)."""
    from gpt2cli import kernels

    prompt = tok.encode("Hello, world")
    for backend, block in (("cpu", 256), ("gpu", 128)):
        engine = Engine(*tiny_a, chosen=kernels.choose(backend=backend))
        assert engine.cache_block == block
        cache = PromptCache()
        generate(engine, tok, prompt, max_new_tokens=60, prompt_cache=cache)
        needed = len(prompt) + 60 - 1 + engine.chunk  # the prompt, the tokens fed back, a chunk
        assert cache.cache.length == -(-needed // block) * block


def test_bfloat16_engine_follows_the_float32_greedy_path(tiny_a, golden):
    """Up to the first step where HF's top two tokens are closer than bfloat16's error: tiny-a's
    bfloat16 logits lie within 0.02 of HF's (on CPU, with the CPU's or a GPU's kernels), so two
    logits 0.05 apart keep their order whatever rounding a backend does."""
    engine = Engine(*tiny_a, dtype="bfloat16")
    arrays = golden["arrays"]
    prompt = arrays["tiny_a/gen0/prompt_ids"].tolist()
    reference = arrays["tiny_a/gen0/tokens"].tolist()
    margins = arrays["tiny_a/gen0/margin"]
    assert (margins[:8] >= BF16_TIE).all()  # so at least 8 tokens are checked
    check_continuation(greedy_tokens(engine, prompt, len(reference)), reference, margins, BF16_TIE)


def test_bfloat16_decode_never_widens_a_weight_matrix_in_memory(tiny_a, golden):
    """XLA:CPU likes to widen bfloat16 weights to float32 copies (a gather's table, a product's
    operand hoisted out of the decode loop); each copy costs more than the step itself."""
    config, params = tiny_a
    engine = Engine(config, params, dtype="bfloat16")
    if engine.kernels.backend != "cpu":  # a GPU's kernels (or --simulate-gpu) keep a bf16 cache
        pytest.skip("XLA:CPU's widening of bfloat16 weights; other backends get other kernels")
    decode = engine.programs.decode
    seen = []

    class Recorder:
        def __init__(self, programs):
            self.prefill = programs.prefill

        def decode(self, params, state, steering, *, rule):
            shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
            seen.append((params, shapes, rule))
            return decode(params, state, steering, rule=rule)

    engine.programs = Recorder(engine.programs)
    greedy_tokens(engine, golden["arrays"]["tiny_a/gen1/prompt_ids"].tolist(), 6)
    params, shapes, rule = seen[0]
    temp = decode.lower(params, shapes, rule=rule).compile().memory_analysis().temp_size_in_bytes
    wte_in_float32 = config.vocab_size * config.n_embd * 4
    assert temp < wte_in_float32 / 2, f"{temp} bytes of temporaries"


def test_window_is_enforced_with_the_overflow_named():
    with pytest.raises(UserError, match="exceeds the model's context window of 128 by 2 tokens"):
        fit_prompt(list(range(30)), 100, 128, truncate=False)
    assert fit_prompt(list(range(30)), 100, 128, truncate=True) == list(range(2, 30))
    with pytest.raises(UserError, match="at least 1"):
        fit_prompt([1], 0, 128, truncate=False)
    with pytest.raises(UserError, match="empty"):
        fit_prompt([], 5, 128, truncate=False)


def test_logits_at_gives_the_same_logits_as_the_full_forward(tiny_b, golden):
    config, params = tiny_b
    ids = jnp.asarray(golden["arrays"]["tiny_b/input_ids"])  # [2, 16]
    model = GPT2(config)
    full, _ = model.apply({"params": params}, ids)
    picked, _ = model.apply({"params": params}, ids, logits_at=jnp.asarray([3, 15]))
    np.testing.assert_allclose(picked[:, 0], full[jnp.arange(2), jnp.asarray([3, 15])], atol=1e-6)
    np.testing.assert_allclose(full, golden["arrays"]["tiny_b/logits"], atol=1e-4)
