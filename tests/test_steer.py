"""Steering while decoding (`Engine(..., steering=Steering(layer, vector, scale))` and the
`--steer` flags of generate, chat and serve): the cached, compiled decoding gives the tokens
that full forward passes with the lens's `add_vector` hook give; scale 0 is plain decoding."""

from __future__ import annotations

import numpy as np
import pytest

import gpt2cli
from gpt2cli import lens
from gpt2cli.engine import Engine, SamplingParams, Steering
from gpt2cli.errors import ParameterError
from gpt2cli.generate import TokenRun
from tests.conftest import TINY_A
from tests.conftest import cli as gpt2

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
    with pytest.raises(ParameterError, match=r"^layer must lie in \[0, 3\), got 3$"):
        Engine(*tiny_b, steering=Steering(3, vector))
    with pytest.raises(ParameterError, match=r"^vector must be \[n_embd\] = \[32\], got \(16,\)$"):
        Engine(*tiny_b, steering=Steering(0, vector[:16], 0.0))


# ---- the --steer flags -------------------------------------------------------------------

COMMANDS = {
    "generate": ["generate", "hi", "-m", str(TINY_A), "-n", "4"],
    "chat": ["chat", "-m", str(TINY_A)],
    "serve": ["serve", "-m", str(TINY_A), "--port", "0"],  # refused before it listens
}


@pytest.fixture(autouse=True)
def no_compile_cache(monkeypatch):
    monkeypatch.setenv("GPT2_NO_COMPILE_CACHE", "1")


@pytest.fixture(scope="session")
def vector_a(tmp_path_factory) -> str:
    """A steering vector of tiny-a's width (16), strong enough to change its greedy text."""
    path = tmp_path_factory.mktemp("steer") / "a.npy"
    lens.save_vector(path, np.random.default_rng(1).normal(size=16) * 3)
    return str(path)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_vector_of_another_width_is_one_line(command, tmp_path):
    wide = lens.save_vector(tmp_path / "wide.npy", np.ones(32, np.float32))
    done = gpt2(*COMMANDS[command], "--steer", str(wide), "--steer-layer", "1", input="hi\n")
    assert done.exit_code == 1, done.stdout
    assert done.stderr.strip().splitlines() == [
        f"error: steering vector {wide} has width 32, but this model's residual stream has 16: "
        "make it with the same model"
    ]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "flags, words",
    [
        (["--steer-layer", "2"], ["--steer-layer", "2 is outside this model's 0..1"]),
        (["--steer-layer", "-1"], ["--steer-layer", "greater than or equal to 0"]),
        ([], ["--steer-layer", "--steer needs"]),
    ],
)
def test_a_layer_the_model_lacks_is_a_usage_error(command, flags, words, vector_a):
    done = gpt2(*COMMANDS[command], "--steer", vector_a, *flags, input="hi\n")
    assert done.exit_code == 2, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Usage: "), done.stderr
    assert lines[1].startswith("error: ") and all(w in lines[1] for w in words), done.stderr


def test_steer_layer_or_scale_without_a_vector_is_a_usage_error():
    done = gpt2(*COMMANDS["generate"], "--steer-scale", "2")
    assert done.exit_code == 2 and "--steer-scale: it only applies with --steer" in done.stderr


def test_a_steered_servers_greedy_completion_is_gpt2_generate_steered(vector_a):
    from tests.helpers_serve import ServerProcess, post_json

    flags = ["--steer", vector_a, "--steer-layer", "1", "--steer-scale", "2.5"]
    prompt, n = "I think dogs are", "12"
    steered = gpt2("generate", prompt, "-m", str(TINY_A), "-n", n, *flags)
    plain = gpt2("generate", prompt, "-m", str(TINY_A), "-n", n)
    assert steered.exit_code == 0 and plain.exit_code == 0, steered.stderr + plain.stderr
    assert steered.stdout != plain.stdout
    server = ServerProcess("--max-batch", "1", "--prefill-chunk", "32", *flags)  # fewer compiles
    try:
        server.wait_ready()
        body = {"prompt": prompt, "max_tokens": int(n), "temperature": 0}
        status, _, out = post_json(server.port, "/v1/completions", body)
    finally:
        assert server.stop() == 0
    assert status == 200, out
    assert prompt + out["choices"][0]["text"] + "\n" == steered.stdout
