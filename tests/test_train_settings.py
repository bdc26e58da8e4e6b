"""The train settings: one field each, read by the flags, --config TOML, --print-config,
run.json and the resume check."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import typer

from gpt2cli.cli.app import app
from gpt2cli.config import preset
from gpt2cli.errors import ParameterError
from gpt2cli.training import config_file, settings
from gpt2cli.training.plan import train_config_for
from gpt2cli.training.trainer import TrainConfig
from tests.conftest import cli as gpt2_in_process
from tests.helpers_train import isolate, write_corpus

gpt2 = gpt2_in_process


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)


def test_every_setting_is_a_flag_with_its_help():
    command = typer.main.get_command(app).commands["train"]
    options = {name: p for p in command.params for name in p.opts}
    for name, (_, f) in settings.FIELDS.items():
        assert settings.flag(name) in options, name
        assert options[settings.flag(name)].help.replace("\\[", "[").startswith(f.metadata["help"])
    assert "-m" in options and "-d" in options and "--print-config" in options


def test_the_trainer_takes_the_settings_resolved_and_has_no_defaults_of_its_own():
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(TrainConfig))
    core = train_config_for(preset("gpt2"))
    for name in ("batch_size", "grad_accum", "weight_decay", "beta1", "beta2", "grad_clip", "seed"):
        assert getattr(core, name) == settings.default_of(name), name
    assert core.seq_length == settings.SEQ_LENGTH and core.warmup == settings.WARMUP
    assert core.lr == settings.FINE_TUNE_LR and core.min_lr == settings.FINE_TUNE_LR / 10


def test_print_config_writes_what_was_given_and_derived_values_as_comments(tmp_path):
    printed = gpt2("train", "--init", "tiny", "-d", "a.txt", "--n-layer", "3", "--steps", "50",
                   "--print-config")  # fmt: skip
    assert printed.exit_code == 0, printed.output
    assert "\n# decay-steps = 50  # derived: " in printed.stdout
    assert "\n# warmup = 5  # derived: " in printed.stdout
    (tmp_path / "run.toml").write_text(printed.stdout)
    values = config_file.read(tmp_path / "run.toml")
    assert values["n_layer"] == 3 and values["dataset"] == ["a.txt"] and values["steps"] == 50
    assert {"lr", "min_lr", "warmup", "decay_steps", "seq_length", "n_head"}.isdisjoint(values)
    again = gpt2("train", "--config", "run.toml", "--steps", "60", "--n-embd", "128",
                 "--print-config")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "\n# decay-steps = 60  # derived: " in again.stdout  # derived again from --steps
    assert "\n# lr = 0.0036  # derived: " in again.stdout  # and from the new width
    (tmp_path / "again.toml").write_text(again.stdout)
    assert config_file.read(tmp_path / "again.toml") == {**values, "steps": 60, "n_embd": 128}


@pytest.mark.slow
def test_the_readme_flow_print_config_then_more_steps_ends_the_cosine_at_the_new_count(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", lines=60)
    shape = ("--init", "tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
             "--batch-size", "2", "--seq-length", "16", "--log-every", "1", "-d", str(corpus))  # fmt: skip
    printed = gpt2("train", *shape, "--steps", "2", "--print-config")
    (tmp_path / "run.toml").write_text(printed.stdout)
    via_file = gpt2("train", "--config", "run.toml", "--steps", "4", "--out", "file")
    assert via_file.exit_code == 0, via_file.output
    via_flags = gpt2("train", *shape, "--steps", "4", "--out", "flags")
    assert via_flags.exit_code == 0, via_flags.output
    spec = {run: json.loads((tmp_path / run / "run.json").read_text()) for run in ("file", "flags")}
    assert spec["file"] == spec["flags"]
    assert spec["file"]["settings"]["decay_steps"] == 4
    records = [json.loads(line) for line in (tmp_path / "file/metrics.jsonl").open()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}  # step k ran at schedule(k - 1)
    peak, low = spec["file"]["settings"]["lr"], spec["file"]["settings"]["min_lr"]
    for step in (3, 4):  # a cosine over 4 steps, not one stuck at min_lr from step 2 on
        cosine = low + 0.5 * (peak - low) * (1 + math.cos(math.pi * (step - 1) / 4))
        assert lrs[step] == pytest.approx(cosine, rel=1e-5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stepz = 3\n", "run.toml: unknown key 'stepz'"),
        ("steps = 'three'\n", "run.toml: steps must be an integer, got 'three'"),
        ("[train]\nsteps = 3\n", "unknown key 'train' (a table? keys are flat"),
        ("dataset = 'a.txt'\n", "dataset must be a list of strings"),
        ("steps = \n", "run.toml: "),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, text, message):
    (tmp_path / "run.toml").write_text(text)
    done = gpt2("train", "--config", "run.toml", "--init", "tiny", "-d", "x.txt")
    assert done.exit_code == 1
    assert message in done.output and len(done.output.strip().splitlines()) == 1, done.output


def test_dashes_or_underscores_and_ints_as_floats(tmp_path):
    (tmp_path / "run.toml").write_text("batch_size = 2\nlog-every = 5\nlr = 1\n")
    assert config_file.read(tmp_path / "run.toml") == {"batch_size": 2, "log_every": 5, "lr": 1.0}


def test_print_config_does_not_import_jax(tmp_path):
    code = (
        "import sys; from typer.testing import CliRunner; from gpt2cli.cli.app import app; "
        "r = CliRunner().invoke(app, ['train', '--init', 'tiny', '-d', 'a', '--print-config']); "
        "assert r.exit_code == 0, r.output; assert 'jax' not in sys.modules; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


@pytest.mark.slow
def test_run_json_records_the_settings_and_resume_reads_them(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", lines=60)
    (tmp_path / "run.toml").write_text(
        f'dataset = ["{corpus}"]\ninit = "tiny"\nn-embd = 32\nn-head = 2\nsteps = 2\n'
        'batch-size = 2\nseq-length = 16\nout = "run"\n'
    )
    done = gpt2("train", "--config", "run.toml")
    assert done.exit_code == 0, done.output
    recorded = json.loads((tmp_path / "run/run.json").read_text())["settings"]
    assert recorded["n_embd"] == 32 and recorded["lr"] == 1e-2 and recorded["decay_steps"] == 2
    shown = gpt2("train", "--resume", "run", "--steps", "3", "--print-config")
    (tmp_path / "resumed.toml").write_text(shown.stdout)
    assert config_file.read(tmp_path / "resumed.toml")["steps"] == 3
    changed = gpt2("train", "--resume", "run", "--config", "run.toml", "--seed", "5")
    assert changed.exit_code == 1 and "--seed cannot be combined with --resume" in changed.output
    same = gpt2("train", "--resume", "run", "--config", "run.toml", "--steps", "3")
    assert same.exit_code == 0, same.output  # the file's fixed values equal the run's
    metrics = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 3


def test_the_core_names_the_parameter_and_the_command_its_flag(tmp_path):
    with pytest.raises(ParameterError, match="^min_lr must be at least 0, got -1.0$"):
        train_config_for(preset("tiny"), min_lr=-1.0)
    done = gpt2("train", "--init", "tiny", "-d", str(write_corpus(tmp_path / "c.txt")),
                "--min-lr", "-1", "--steps", "1")  # fmt: skip
    assert done.exit_code == 2
    assert "error: Invalid value for --min-lr: must be at least 0, got -1.0" in done.output


RANGES = [  # (setting, a value outside its range, the problem)
    ("beta2", 1.5, "must be in [0, 1), got 1.5"),
    ("beta1", -1, "must be in [0, 1), got -1.0"),
    ("num_processes", 0, "must be at least 1, got 0"),
    ("steps", 2147483648, "must be at most 2147483647, got 2147483648"),
    ("steps", 99999999999999999999, "must be at most 2147483647, got 99999999999999999999"),
    ("batch_size", 0, "must be at least 1, got 0"),
    ("keep", 0, "must be at least 1, got 0"),
    ("n_head", 0, "must be at least 1, got 0"),
    ("lr", 0, "must be greater than 0, got 0.0"),
    ("dropout", 1.0, "must be in [0, 1), got 1.0"),
    ("seed", -1, "must be in [0, 4294967295], got -1"),
]


@pytest.mark.parametrize(("name", "value", "problem"), RANGES)
def test_a_value_out_of_range_is_refused_the_same_way_from_a_flag_or_a_config(
    tmp_path, name, value, problem
):
    written = {p.name for p in tmp_path.iterdir()}
    done = gpt2("train", "--init", "tiny", "-d", "a.txt", settings.flag(name), str(value))
    assert done.exit_code == 2, done.output
    assert f"error: Invalid value for {settings.flag(name)}: {problem}" in done.output
    (tmp_path / "run.toml").write_text(f"{name.replace('_', '-')} = {value}\n")
    done = gpt2("train", "--init", "tiny", "-d", "a.txt", "--config", "run.toml")
    assert done.exit_code == 1
    assert done.output.strip() == f"error: run.toml: {name} {problem}"
    assert {p.name for p in tmp_path.iterdir()} == written | {"run.toml"}


def test_every_number_setting_has_a_range():
    for name, (_, f) in settings.FIELDS.items():
        if settings.field_type(name) in (int, float, int | None, float | None):
            assert f.metadata["allowed"] is not None, name


def test_a_process_id_beyond_the_process_count_is_a_usage_error():
    done = gpt2("train", "--init", "tiny", "-d", "a.txt", "--process-id", "5")
    assert done.exit_code == 2
    assert "Invalid value for --process-id: must be below the process count (1), got 5" in (
        done.output
    )


def test_a_setting_spelled_twice_in_a_config_is_refused(tmp_path):
    (tmp_path / "run.toml").write_text("batch-size = 2\nbatch_size = 4\n")
    done = gpt2("train", "--init", "tiny", "-d", "a.txt", "--config", "run.toml", "--print-config")
    assert done.exit_code == 1
    assert done.output.strip() == (
        "error: run.toml: 'batch-size' and 'batch_size' are the same setting; keep one"
    )
