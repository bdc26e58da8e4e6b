"""The train settings: one field each, read by the flags, --config TOML, --print-config,
run.json and the resume check."""

from __future__ import annotations

import dataclasses
import json
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


def test_print_config_round_trips_through_config(tmp_path):
    printed = gpt2("train", "--init", "tiny", "-d", "a.txt", "--n-layer", "3", "--steps", "50",
                   "--print-config")  # fmt: skip
    assert printed.exit_code == 0, printed.output
    (tmp_path / "run.toml").write_text(printed.stdout)
    values = config_file.read(tmp_path / "run.toml")
    assert values["n_layer"] == 3 and values["dataset"] == ["a.txt"]
    assert values["lr"] == pytest.approx(7.2e-3) and values["warmup"] == 5  # derived, resolved
    assert "n_head" not in values  # unset stays unset (a comment)
    again = gpt2("train", "--config", "run.toml", "--steps", "60", "--print-config")
    assert again.exit_code == 0, again.output
    reread = {**values, "steps": 60, "decay_steps": 50}  # the flag wins; resolved ones stay
    (tmp_path / "again.toml").write_text(again.stdout)
    assert config_file.read(tmp_path / "again.toml") == reread


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
    with pytest.raises(ParameterError, match="^min_lr must be >= 0, got -1.0$"):
        train_config_for(preset("tiny"), min_lr=-1.0)
    done = gpt2("train", "--init", "tiny", "-d", str(write_corpus(tmp_path / "c.txt")),
                "--min-lr", "-1", "--steps", "1")  # fmt: skip
    assert done.exit_code == 1 and "error: --min-lr must be >= 0, got -1.0" in done.output
