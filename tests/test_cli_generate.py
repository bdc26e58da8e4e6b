"""`gpt2 generate`: flags, output formats and one-line errors."""

import json
import os
import subprocess

import pytest

from tests.conftest import TINY_A, gpt2_exe, run_gpt2
from tests.conftest import cli as gpt2

MODEL = ["-m", str(TINY_A)]


@pytest.fixture(autouse=True)
def no_compile_cache(monkeypatch):
    monkeypatch.setenv("GPT2_NO_COMPILE_CACHE", "1")


def one_line_error(result, *words):
    assert result.exit_code == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0]


def usage_error(result, *words):
    """A value refused while the flags are parsed: the usage line, one error line, exit 2."""
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Usage: "), result.stderr
    assert lines[1].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[1]


@pytest.mark.parametrize(
    "args, words",
    [
        (["generate", "hi", *MODEL, "--temperature", "-1"], ["temperature", "between 0 and 100"]),
        (["generate", "hi", *MODEL, "--top-p", "7"], ["top_p", "(0, 1]"]),
        (["generate", "hi", *MODEL, "--repetition-penalty", "0"], ["repetition_penalty"]),
        (["generate", "hi", *MODEL, "--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
        (["bench", *MODEL, "--top-p", "0"], ["top_p must be in (0, 1]"]),
    ],
)
def test_bad_sampling_values_are_usage_errors(args, words):
    usage_error(gpt2(*args), *words)


def test_greedy_stream_prints_prompt_then_continuation(golden):
    done = gpt2("generate", "Hello, world", *MODEL, "--max-new-tokens", "20")
    assert done.exit_code == 0, done.stderr
    expected = golden["models"]["tiny_a"]["generate"]["prompts"][0]["tokens_text"]
    assert done.stdout == "Hello, world" + expected + "\n"


def test_seed_flags_max_length_and_prompt_still_work(golden):
    done = gpt2(
        "generate", "--prompt", "Hello, world", "--checkpoint", str(TINY_A), "--max-length", "8"
    )
    assert done.exit_code == 0, done.stderr
    expected = golden["models"]["tiny_a"]["generate"]["prompts"][0]["tokens_text"]
    assert done.stdout == "Hello, world" + expected[: len(" Ur Ur Ur Ur Ur")] + "\n"  # 3 + 5 tokens


def test_json_samples_from_stdin_one_object_each():
    done = gpt2(
        "generate",
        "-",
        *MODEL,
        "--num-samples",
        "2",
        "--temperature",
        "1",
        "--seed",
        "3",
        "-n",
        "5",
        "--json",
        input="The meaning of life is\n",
    )
    assert done.exit_code == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["sample"] for r in records] == [0, 1]
    for r in records:
        assert r["prompt"] == "The meaning of life is"
        assert len(r["token_ids"]) == 5 and r["finish_reason"] == "length"
        assert set(r["timings"]) == {"prompt_seconds", "generation_seconds"}
    assert records[0]["token_ids"] != records[1]["token_ids"]


def test_prompts_file_decodes_every_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello, world\n\nThe capital of France is Paris and\n")
    done = gpt2("generate", "--prompts-file", str(prompts), *MODEL, "-n", "4", "--json")
    assert done.exit_code == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["Hello, world", "The capital of France is Paris and"]


def test_same_seed_same_text_in_a_new_process_which_fills_the_compile_cache(tmp_path):
    args = ["generate", "Once upon a time", *MODEL, "--temperature", "1", "--seed", "7", "-n", "8"]
    here = gpt2(*args)
    there = run_gpt2(*args, env={"GPT2_NO_COMPILE_CACHE": "", "XDG_CACHE_HOME": str(tmp_path)})
    assert there.returncode == 0, there.stderr
    assert here.stdout == there.stdout
    folder = tmp_path / "gpt2cli" / "jax"
    assert (folder.stat().st_mode & 0o777) == 0o700
    assert len(list(folder.iterdir())) >= 2  # at least the prefill and the decode programs


def test_compile_cache_can_be_turned_off(monkeypatch):
    from gpt2cli import compile_cache

    monkeypatch.setenv("GPT2_NO_COMPILE_CACHE", "1")
    assert compile_cache.enable() is None


def test_piping_into_head_ends_quietly():
    command = f"'{gpt2_exe()}' generate 'Hello, world' -m '{TINY_A}' -n 100 | head -c 10"
    # JAX on the CPU: a GPU's runtime may log to stderr as it starts (not ours to test), and the
    # pipe is handled alike on every backend
    quiet = {"GPT2_NO_COMPILE_CACHE": "1", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        env={**os.environ, **quiet},
        timeout=300,
    )
    assert done.stdout == "Hello, wor"
    assert done.stderr == "" and done.returncode == 0


def test_truncate_keeps_the_end_of_a_long_prompt():
    long = "word " * 120
    one_line_error(gpt2("generate", long, *MODEL, "-n", "20"), "context window of 128 by")
    done = gpt2("generate", long, *MODEL, "-n", "20", "--truncate", "--no-stream")
    assert done.exit_code == 0, done.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["generate", "", *MODEL], ["prompt is empty"]),
        (["generate", "hi", *MODEL, "-n", "5", "--max-length", "9"], ["not both"]),
        (["generate", "--prompts-file", "/nonexistent/p.txt", *MODEL], ["cannot read prompts"]),
        (["generate", *MODEL], ["no prompt"]),
    ],
)
def test_bad_inputs_are_one_line(args, words):
    one_line_error(gpt2(*args), *words)


def test_bench_reports_speeds_as_json():
    done = gpt2(
        "bench", *MODEL, "--prompt-tokens", "8", "--new-tokens", "6", "--repeats", "1", "--json"
    )
    assert done.exit_code == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["batch"], result["prompt_tokens"], result["new_tokens"]) == (1, 8, 6)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "first_token_s", "peak_memory_mib"):
        assert result[key] > 0


def test_bench_samples_when_asked_and_says_how():
    args = ("--prompt-tokens", "8", "--new-tokens", "6", "--repeats", "1")
    done = gpt2("bench", *MODEL, *args, "--temperature", "0.8", "--top-p", "0.9")
    assert done.exit_code == 0, done.stderr
    assert "temperature 0.8, top-p 0.9" in done.stdout


def test_bench_refuses_lengths_over_the_window():
    one_line_error(gpt2("bench", *MODEL, "--prompt-tokens", "100", "--new-tokens", "50"), "128")
