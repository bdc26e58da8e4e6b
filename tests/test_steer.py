"""Steering while decoding (`Engine(..., steering=Steering(layer, vector, scale))` and the
`--steer` flags of generate, chat and serve): the cached, compiled decoding gives the tokens
that full forward passes with the lens's `add_vector` hook give; scale 0 is plain decoding."""

from __future__ import annotations

import numpy as np
import pytest

import gpt2cli
from gpt2cli import lens
from gpt2cli.engine import Engine, SamplingParams, Steering
from gpt2cli.errors import UserError
from gpt2cli.generate import TokenRun

LAYER = 1
SCALE = 4.0
NEW_TOKENS = 10  # more than two decode chunks on a CPU


@pytest.fixture(scope="session")
def vector(tiny_b) -> np.ndarray:
    config, _ = tiny_b
    return np.random.default_rng(0).normal(size=config.n_embd).astype(np.float32)


@pytest.fixture(scope="session")
def prompts(golden) -> list[list[int]]:
    ids = golden["arrays"]["tiny_b/input_ids"]  # [2, 16]
    return [ids[0, :11].tolist(), ids[1, :6].tolist()]


@pytest.fixture(scope="session")
def plain(tiny_b) -> Engine:
    return Engine(*tiny_b)


@pytest.fixture(scope="session")
def steered(tiny_b, vector) -> Engine:
    return Engine(*tiny_b, steering=Steering(LAYER, vector, SCALE))


def greedy(engine: Engine, prompts) -> np.ndarray:
    """The engine's greedy tokens [B, NEW_TOKENS], prefilled into and decoded over a KV cache."""
    run = TokenRun(engine, prompts, max_new_tokens=NEW_TOKENS, sampling_params=SamplingParams())
    return np.stack(list(run), axis=1)


def greedy_without_cache(config, params, prompt, hooks) -> list[int]:
    """Greedy tokens by a full forward pass per token (no cache), with the lens's hooks. The ids
    are padded to one width, so one program runs every pass: a position sees none after it."""
    ids = np.zeros((1, len(prompt) + NEW_TOKENS), np.int32)
    ids[0, : len(prompt)] = prompt
    for t in range(len(prompt), ids.shape[1]):
        logits = gpt2cli.run_with_hooks(config, params, ids, hooks=hooks)
        ids[0, t] = int(np.argmax(logits[0, t - 1]))
    return ids[0, len(prompt) :].tolist()


def test_steered_decoding_equals_full_forward_passes_with_the_lens_hook(
    tiny_b, vector, prompts, plain, steered
):
    """One row (right-padded) and two rows (left-padded): every decode step steers too."""
    config, params = tiny_b
    hooks = {f"blocks.{LAYER}.resid_pre": lens.add_vector(vector, SCALE)}
    truth = [greedy_without_cache(config, params, p, hooks) for p in prompts]
    alone = [greedy(steered, [p])[0].tolist() for p in prompts]
    together = greedy(steered, prompts).tolist()
    assert alone == together == truth
    assert greedy(plain, prompts).tolist() != truth  # the steering changes the text


def test_scale_zero_is_plain_decoding_with_the_plain_programs(tiny_b, vector, prompts, plain):
    want = greedy(plain, prompts)
    traces = plain.programs.traces
    off = Engine(*tiny_b, steering=Steering(LAYER, vector, 0.0))
    assert off.steering is None
    np.testing.assert_array_equal(greedy(off, prompts), want)
    assert off.programs is plain.programs and plain.programs.traces == traces  # nothing new


def test_a_new_vector_or_scale_reuses_the_steered_programs(tiny_b, vector, prompts, steered):
    first = greedy(steered, prompts)
    traces = steered.programs.traces
    other = Engine(*tiny_b, steering=Steering(LAYER, -vector, 2.0))
    assert not np.array_equal(greedy(other, prompts), first)
    assert steered.programs.traces == traces


def test_steering_the_model_lacks_is_refused(tiny_b, vector):
    with pytest.raises(UserError, match=r"steering layer must lie in \[0, 3\), got 3"):
        Engine(*tiny_b, steering=Steering(3, vector))
    with pytest.raises(UserError, match=r"must be \[n_embd\] = \[32\], got \(16,\)"):
        Engine(*tiny_b, steering=Steering(0, vector[:16], 0.0))

