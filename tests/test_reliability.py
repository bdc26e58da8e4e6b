"""The reliability sweep (issue 12, items 5-12): what a user types never ends in a raw Python
error, a quiet wrong answer, or a chat that dies; every error has one shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import TINY_A, TINY_B, cli, gpt2_exe, run_gpt2

CHAT = ("chat", "-m", str(TINY_A), "--temperature", "0", "--max-new-tokens", "3")
RAW_ERRORS = ("Traceback", "TypeError", "OverflowError", "AttributeError", "IsADirectoryError")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT2_NO_COMPILE_CACHE", "1")
    monkeypatch.delenv("GPT2_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


def one_error_line(result, *words, code=1):
    """A CliRunner result or a finished process: exit `code`, one `error:` line naming `words`."""
    output = result.output if hasattr(result, "output") else result.stderr
    exit_code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert exit_code == code, output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, output
    for word in words:
        assert word in errors[0], output
    assert not any(raw in output for raw in RAW_ERRORS), output
    return errors[0]


def nan_model(tmp_path):
    from gpt2cli.checkpoint import save_npz
    from gpt2cli.weights import load_hf_folder

    config, params = load_hf_folder(TINY_A)
    params["h_1"]["mlp"]["c_fc"]["kernel"] = np.full_like(
        params["h_1"]["mlp"]["c_fc"]["kernel"], np.nan
    )
    return save_npz(tmp_path / "nan.npz", config, params)


# ---- 5. non-UTF-8 input ------------------------------------------------------------------


def test_piped_chat_skips_a_line_that_is_not_utf8_and_answers_the_next():
    done = run_gpt2(*CHAT, input=b"hi \xff there\nsecond\n")
    assert done.returncode == 0, done.stderr
    assert b"line 1 of stdin is not UTF-8 text: byte 0xff at offset 3; skipped" in done.stderr
    assert done.stdout.count(b"\n\n") == 1  # one reply: to "second"
    assert b"Error" not in done.stderr


def test_generate_from_stdin_that_is_not_utf8():
    one_error_line(cli("generate", "-", "-m", str(TINY_A), input=b"hi \xff"),
                   "stdin is not UTF-8 text: byte 0xff at offset 3")  # fmt: skip


def test_a_prompt_argument_that_is_not_utf8_under_the_c_locale():
    done = run_gpt2("generate", b"hi \xff", "-m", str(TINY_A), env={"LC_ALL": "C"})
    one_error_line(done, "the prompt is not UTF-8 text: byte 0xff at offset 3")


# ---- 6, 7. seeds and slash commands --------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_seed_beyond_32_bits_is_a_usage_error_before_any_output(command):
    args = [command, "hi"] if command == "generate" else [command]
    done = cli(*args, "-m", str(TINY_A), "--seed", "4294967296")
    assert done.exit_code == 2, done.output
    assert done.stdout == ""
    assert "seed must be an integer from 0 to 4294967295, got 4294967296" in done.output


def test_chat_survives_bad_slash_commands(tmp_path):
    (tmp_path / "some_dir").mkdir()
    done = run_gpt2(*CHAT, input="/set seed 99999999999999999999\n/save some_dir --force\n"
                    "/set temperature nan\nhello\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "seed must be an integer from 0 to 4294967295" in done.stderr
    assert "some_dir is a folder" in done.stderr
    assert "/set temperature: 'nan' is not a finite number" in done.stderr
    assert done.stdout.count("\n\n") == 1  # the reply to "hello"
    assert not any(raw in done.stderr for raw in RAW_ERRORS), done.stderr


# ---- 8. what is read is validated ---------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tests.helpers_train import write_corpus

    base = tmp_path_factory.mktemp("run")
    corpus = write_corpus(base / "corpus.txt")
    done = cli("train", "--dataset", str(corpus), "-m", str(TINY_A), "--steps", "1",
               "--batch-size", "2", "--seq-length", "16", "--out", str(base / "run"))  # fmt: skip
    assert done.exit_code == 0, done.output
    return base


def test_resume_after_the_dataset_was_deleted(tmp_path, finished_run):
    import shutil

    shutil.copytree(finished_run, tmp_path / "copy")
    spec = json.loads((tmp_path / "copy/run/run.json").read_text())
    spec["data"]["dataset"] = [str(tmp_path / "copy/corpus.txt")]
    (tmp_path / "copy/run/run.json").write_text(json.dumps(spec))
    (tmp_path / "copy/corpus.txt").unlink()
    one_error_line(cli("train", "--resume", "copy/run", "--steps", "2"),
                   "the run's dataset file", "corpus.txt is gone")  # fmt: skip


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("settings", "batch_size", "two", "settings.batch_size must be an integer, got 'two'"),
        ("settings", "steps", None, "settings.steps must be an integer, got None"),
        ("data", "dataset", 5, "data.dataset must be a list, got 5"),
        (None, "model_config", "x", "model_config is missing or not a dict"),
    ],
)
def test_a_hand_edited_run_json_names_the_file_and_field(
    tmp_path, finished_run, section, key, value, message
):
    import shutil

    shutil.copytree(finished_run / "run", tmp_path / "run")
    spec = json.loads((tmp_path / "run/run.json").read_text())
    (spec[section] if section else spec)[key] = value
    (tmp_path / "run/run.json").write_text(json.dumps(spec))
    one_error_line(cli("train", "--resume", "run", "--steps", "2"), "run.json: " + message)


def test_a_shard_index_whose_weight_map_is_not_a_mapping(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((TINY_A / "config.json").read_text())
    (folder / "model.safetensors.index.json").write_text('{"weight_map": 5}')
    one_error_line(cli("inspect", str(folder)), "model.safetensors.index.json", "weight_map")


def test_running_out_of_memory_says_what_to_lower(monkeypatch):
    import gpt2cli.hub

    class JaxRuntimeError(RuntimeError):  # the name is what the boundary recognises
        pass

    def exhausted(*args, **kwargs):
        raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 81920000000 bytes.")

    monkeypatch.setattr(gpt2cli.hub, "load_model", exhausted)
    line = one_error_line(cli("generate", "hi", "-m", "x.npz", "--num-samples", "100000"),
                          "out of memory")  # fmt: skip
    assert "--num-samples" in line


# ---- 9, 10. quiet wrongs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "--dataset", "x.txt", "--stride", "0"],
        ["eval", "--dataset", "x.txt", "--seq-length", "0"],
        ["generate", "hi", "--stop", ""],
        ["chat", "--stop", ""],
        ["generate", "hi", "-n", "0"],
        ["generate", "hi", "--top-p", "1.5"],
        ["chat", "--repetition-penalty", "0"],
        ["bench", "--batch", "0"],
        ["generate", "hi", "--num-samples", "0"],
        ["eval", "--dataset", "x.txt", "--batch-size", "99999999999999999999"],
        ["train", "--dataset", "x.txt", "--steps", "99999999999999999999"],
    ],
)
def test_bad_values_are_usage_errors_caught_before_loading(args):
    code = ("import sys, atexit; from gpt2cli.cli.app import main; "
            "atexit.register(lambda: print('jax loaded:', 'jax' in sys.modules, file=sys.stderr));"
            " main()")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, *args, "-m", str(TINY_A)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("Usage: "), done.stderr
    assert lines[1].startswith("error: ") and len(lines) == 3, done.stderr
    assert lines[2] == "jax loaded: False"


def test_nan_weights_are_reported_by_inspect_and_refused_by_generate(tmp_path):
    path = nan_model(tmp_path)
    shown = cli("inspect", str(path), "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["nonfinite"] == ["h_1/mlp/c_fc/kernel"]
    assert "non-finite values in 1 array (h_1/mlp/c_fc/kernel)" in shown.stderr
    one_error_line(cli("generate", "hi", "-m", str(path)), "non-finite values",
                   "h_1/mlp/c_fc/kernel")  # fmt: skip


def test_a_checkpoint_without_its_config_is_named_as_such(tmp_path):
    from gpt2cli.checkpoint import HEADER_KEY

    with np.load(nan_model(tmp_path)) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(str(arrays[HEADER_KEY]))
    del header["config"]
    arrays[HEADER_KEY] = np.array(json.dumps(header))
    np.savez(tmp_path / "noconfig.npz", **arrays)
    one_error_line(cli("inspect", "noconfig.npz"), "noconfig.npz", "no model config")


@pytest.mark.parametrize("key", ["n_embd", "n_layer"])
def test_a_config_json_without_a_shape_key_names_it(tmp_path, key):
    import shutil

    shutil.copytree(TINY_A, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    del config[key]
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    one_error_line(cli("inspect", "m"), f"has no {key}")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("n_embd", "big", "config field n_embd must be a whole number, got 'big'"),
        ("layer_norm_epsilon", "1e-5", "config field layer_norm_epsilon must be a finite number"),
        ("n_inner", 2.5, "config field n_inner must be a whole number or null, got 2.5"),
    ],
)
def test_a_config_json_with_a_mistyped_field_names_it(tmp_path, key, value, message):
    import shutil

    shutil.copytree(TINY_A, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    config[key] = value
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    one_error_line(cli("inspect", "m"), "config.json", message)


def test_a_preamble_too_long_for_the_window_says_so():
    done = run_gpt2(*CHAT, input="/system " + "word " * 300 + "\nhello\n")
    assert done.returncode == 0, done.stderr
    assert "the preamble is 300 tokens: too long for the model's 128-token window" in done.stderr
    assert "<= -" not in done.stderr


def test_a_prompt_outside_the_models_vocabulary_names_the_tokenizer_flag():
    # tiny-b has 512 ids and no tokenizer of its own: GPT-2's ids for "Hello" lie beyond it
    line = one_error_line(cli("generate", "Hello", "-m", str(TINY_B)), "the prompt 'Hello'")
    assert "vocabulary has 512 ids" in line and line.endswith(
        "pass the model's tokenizer with --tokenizer"
    )


# ---- 11, 12. one error shape; pipes ---------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["frobnicate"], ["convert", "a", "b", "--dtype", "int8"], ["generate", "hi", "--seed", "abc"]],
)
@pytest.mark.parametrize("columns", ["80", "20"])
def test_usage_errors_are_a_usage_line_and_one_error_line(args, columns):
    done = run_gpt2(*args, env={"COLUMNS": columns})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Usage: gpt2"), done.stderr
    assert lines[1].startswith("error: "), done.stderr


def test_debug_is_accepted_after_the_command(monkeypatch):
    monkeypatch.setenv("GPT2_DEBUG", "")  # --debug sets it to 1: undone after the test
    done = cli("inspect", "missing.npz", "--debug")
    assert isinstance(done.exception, Exception) and "missing.npz" in str(done.exception)


def test_bare_gpt2_prints_help_and_exits_0():
    done = run_gpt2()
    assert done.returncode == 0 and done.stdout.startswith("Usage: gpt2")


def test_train_errors_start_with_error_not_a_blank_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    done = run_gpt2("train", "--dataset", "latin1.txt", "-m", str(TINY_A), "--steps", "1",
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("error: dataset "), repr(done.stderr)
    assert "latin1.txt is not UTF-8" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["train", "--help"],
        ["inspect", str(TINY_A)],
        ["generate", "hi", "-m", str(TINY_A), "-n", "2"],
    ],  # fmt: skip
)
def test_a_reader_that_left_is_not_an_error(args):
    read, write = os.pipe()
    os.close(read)  # `| head -1` that has already exited
    # JAX on the CPU: a GPU's runtime may log to stderr as it starts (not ours to test)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    with os.fdopen(write, "wb") as stdout:
        done = subprocess.run([gpt2_exe(), *args], stdout=stdout, stderr=subprocess.PIPE,
                              env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""


def test_help_starts_with_usage():
    assert run_gpt2("--help").stdout.startswith("Usage: gpt2 [OPTIONS] COMMAND")


def test_piped_inspect_is_not_cut_to_the_terminal_width():
    done = run_gpt2("inspect", str(TINY_A), env={"COLUMNS": "20"})
    assert done.returncode == 0, done.stderr
    assert "n_positions" in done.stdout and "c_attn" in done.stdout
    assert "total parameters:" in done.stdout
