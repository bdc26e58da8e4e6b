"""`gpt2 train` in-process: optimizer pieces, learning, the seed's command, bad inputs."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from gpt2cli.checkpoint import load_npz
from gpt2cli.config import preset
from gpt2cli.training.plan import train_config_for
from gpt2cli.training.trainer import decay_mask, learning_rate
from tests.conftest import cli as gpt2
from tests.helpers_train import TINY_A, Recorder, losses, write_corpus


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT2_NO_COMPILE_CACHE", "1")  # no compiled programs in ~/.cache
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
    """A short bfloat16 fine-tuning run of the tiny-a fixture, for the resume tests."""
    out = tmp_path_factory.mktemp("runs") / "ft"
    done = gpt2("train", "--dataset", str(corpus), "-m", str(TINY_A), *FT, "--save-every", "1",
                "--keep", "2", "--log-every", "1", "--out", str(out))  # fmt: skip
    assert done.exit_code == 0, done.output
    return out


# Fine-tuning settings shared by several tests, so the step compiles once.
FT = ("--steps", "3", "--batch-size", "2", "--seq-length", "16", "--dtype", "bfloat16")


def test_bfloat16_run_keeps_float32_weights_and_the_last_checkpoints(finished_run):
    config, params = load_npz(finished_run / "final.npz")
    assert params["h_0"]["attn"]["c_attn"]["kernel"].dtype == np.float32  # the master weights
    assert [p.name for p in sorted(finished_run.glob("ckpt-*.npz"))] == [
        "ckpt-0000002.npz",
        "ckpt-0000003.npz",
    ]  # --keep 2
    steps = losses(finished_run)
    assert sorted(steps) == [1, 2, 3] and all(math.isfinite(v) for v in steps.values())


def test_learning_rate_warms_up_then_decays_to_min():
    tc = train_config_for(preset("tiny"), lr=1e-3, min_lr=1e-4, warmup=10, decay_steps=110)
    lr = learning_rate(tc)
    assert float(lr(0)) == pytest.approx(1e-4)  # the first step already moves
    assert float(lr(9)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(5.5e-4)  # half-way down the cosine
    assert float(lr(110)) == pytest.approx(1e-4) and float(lr(500)) == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices():
    from gpt2cli.model import init_params

    mask = decay_mask(jax.eval_shape(lambda: init_params(preset("tiny"))))
    assert mask["h_0"]["attn"]["c_attn"]["kernel"] and mask["wte"]["embedding"]
    assert not mask["h_0"]["attn"]["c_attn"]["bias"]
    assert not mask["h_0"]["ln_1"]["scale"] and not mask["ln_f"]["bias"]


def test_seed_command_line_writes_gpt2_finetuned(tmp_path, corpus):
    """The original script's flags, with DATA_DIR, the fixture standing in for gpt2."""
    done = gpt2(
        "train",
        "--dataset",
        corpus.name,
        "--model-name",
        str(TINY_A),
        "--batch-size",
        "2",
        "--seq-length",
        "64",
        "--steps",
        "10",
        env={"DATA_DIR": str(corpus.parent)},
    )
    assert done.exit_code == 0, done.output
    config, params = load_npz(tmp_path / "gpt2_finetuned.npz")
    _, start = load_npz_hf()
    assert config.n_embd == 16 and config.n_layer == 2
    moved = np.abs(params["wte"]["embedding"] - start["wte"]["embedding"]).max()
    assert moved > 1e-5  # trained, not just copied
    shown = gpt2("inspect", "gpt2_finetuned.npz", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["config"]["n_embd"] == 16
    generated = gpt2("generate", "the cat", "-m", "gpt2_finetuned.npz", "--max-new-tokens", "3")
    assert generated.exit_code == 0, generated.output
    assert generated.stdout.startswith("the cat")
    again = gpt2(
        "train",
        "--dataset",
        corpus.name,
        "--model-name",
        str(TINY_A),
        "--steps",
        "1",
        env={"DATA_DIR": str(corpus.parent)},
    )
    assert again.exit_code == 1 and "gpt2_finetuned.npz already exists" in again.output


def load_npz_hf():
    from gpt2cli.hub import load_model

    return load_model(str(TINY_A))


# Settings of the from-scratch runs; the same everywhere, so the step compiles once.
SCRATCH = (
    "--batch-size", "4", "--seq-length", "32", "--lr", "3e-3", "--warmup", "5",
    "--decay-steps", "30", "--val-fraction", "0.1", "--eval-batches", "2"
)  # fmt: skip


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("runs") / "scratch"
    done = gpt2("train", "--dataset", str(corpus), "--init", "tiny", "--steps", "30", *SCRATCH,
                "--eval-every", "15", "--out", str(out))  # fmt: skip
    assert done.exit_code == 0, done.output
    return out


def test_from_scratch_validation_loss_falls(scratch_run):
    records = [json.loads(x) for x in (scratch_run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2
    assert val[-1] < math.log(50257) - 5.0  # from ~10.8 at random init to below 5.8
    assert val[-1] < val[0]
    config, params = load_npz(scratch_run / "final.npz")
    assert config.n_embd == 64 and params["h_1"]["mlp"]["c_fc"]["kernel"].shape == (64, 256)


def test_generate_loads_a_model_trained_from_scratch(scratch_run):
    done = gpt2("generate", "the cat", "-m", str(scratch_run / "final.npz"), "-n", "3")
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("the cat")


def test_grad_accumulation_equals_the_bigger_batch(corpus):
    from gpt2cli.hub import load_model
    from gpt2cli.tokenizer import bundled
    from gpt2cli.training import data
    from gpt2cli.training.loop import LoopSettings, TrainData, train_loop
    from gpt2cli.training.trainer import Trainer

    config, params = load_model(str(TINY_A))
    blocks, _ = data.split(data.load_tokens([corpus], bundled()), 16, 0.0)
    result = {}
    for rows, accum in ((4, 1), (2, 2)):
        tc = train_config_for(
            config,
            batch_size=rows,
            grad_accum=accum,
            seq_length=16,
            lr=1e-2,
            min_lr=3e-5,
            warmup=0,
            decay_steps=3,
            dropout=0.0,
        )
        trainer = Trainer(config, tc)
        hooks = Recorder()
        train_data = TrainData(blocks, None, data.Sampler(len(blocks), 0), rows, accum)
        state, _ = train_loop(
            trainer,
            trainer.create_state(params),
            train_data,
            LoopSettings(steps=3, log_every=1),
            hooks,
        )
        result[accum] = (hooks.losses, jax.device_get(state.params["wpe"]["embedding"]))
    assert result[1][0] == pytest.approx(result[2][0], abs=1e-5)
    assert np.abs(result[1][1] - result[2][1]).max() < 1e-5
    assert result[1][0][0] != result[1][0][2]  # the steps really changed the model


def test_nan_loss_stops_with_a_clear_message(tmp_path, corpus):
    from gpt2cli.checkpoint import save_npz

    config, params = load_npz_hf()
    params["ln_f"]["scale"] = np.full_like(params["ln_f"]["scale"], np.nan)
    save_npz(tmp_path / "broken.npz", config, params)
    done = gpt2("train", "--dataset", str(corpus), "-m", "broken.npz", *FT, "--out", "nan")
    assert done.exit_code == 1
    assert "loss became NaN or infinite at step 1; stopped: no checkpoint was saved" in done.output
    assert not (tmp_path / "nan/final.npz").exists()
    assert not list((tmp_path / "nan").glob("ckpt-*.npz"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "missing/*.txt"], "'missing/*.txt' matches no file"),
        (["--seq-length", "4096"], "--seq-length 4096 exceeds the model's context window of 128"),
        (["--init", "tiny"], "give either --model (fine-tune) or --init (from scratch)"),
        (["--dataset", "latin1.txt"], "latin1.txt is not UTF-8 text: byte 0xe9 at offset 3"),
        (["--dataset", "empty.txt"], "empty.txt is empty"),
        (["--dataset", "short.txt", "--seq-length", "64"], "shorter than one block"),
    ],
)
def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, corpus, args, message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Only a few words here.")
    data = [] if "--dataset" in args else ["--dataset", str(corpus)]
    done = gpt2("train", *data, "-m", str(TINY_A), "--steps", "1", *args)
    assert done.exit_code == 1
    assert message in done.output
    assert len(done.output.strip().splitlines()) == 1, done.output
    written = {p.name for p in tmp_path.iterdir()} - {
        "cache",
        "empty.txt",
        "latin1.txt",
        "short.txt",
    }
    assert not written  # no run folder, no gpt2_finetuned.npz


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    done = gpt2("train", "--resume", "notarun")
    assert done.exit_code == 1 and "not a training run (no run.json in it)" in done.output


def test_resume_refuses_changed_settings(finished_run):
    done = gpt2("train", "--resume", str(finished_run), "--lr", "1")
    assert done.exit_code == 1
    assert "--lr cannot be combined with --resume" in done.output


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path, finished_run, corpus):
    other = tmp_path / "other"
    done = gpt2(
        "train",
        "--dataset",
        str(corpus),
        "--init",
        "tiny",
        "--steps",
        "1",
        *SCRATCH,
        "--out",
        str(other),
    )
    assert done.exit_code == 0, done.output
    foreign = sorted(finished_run.glob("ckpt-*.npz"))[-1]
    before = foreign.read_bytes()
    (other / "ckpt-0000009.npz").write_bytes(before)  # tiny-a's weights in a tiny-preset run
    final = (other / "final.npz").read_bytes()
    done = gpt2("train", "--resume", str(other), "--steps", "12")
    assert done.exit_code == 1
    assert "was made with another model shape" in done.output
    assert (other / "final.npz").read_bytes() == final  # nothing overwritten
    assert foreign.read_bytes() == before


def test_resume_extends_a_finished_run(finished_run):
    done = gpt2("train", "--resume", str(finished_run), "--steps", "5", "--log-every", "1")
    assert done.exit_code == 0, done.output
    assert sorted(losses(finished_run)) == [1, 2, 3, 4, 5]
    spec = json.loads((finished_run / "run.json").read_text())
    assert spec["settings"]["steps"] == 5 and spec["settings"]["decay_steps"] == 3


def test_plot_writes_loss_png(finished_run):
    pytest.importorskip("matplotlib", reason="--plot needs the plot extra (matplotlib)")
    done = gpt2("train", "--resume", str(finished_run), "--steps", "6", "--plot")
    assert done.exit_code == 0, done.output
    assert (finished_run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_says_how_to_install_it(finished_run, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    done = gpt2("train", "--resume", str(finished_run), "--plot")
    assert done.exit_code == 1
    assert (
        "--plot needs matplotlib, in the plot extra: uv pip install 'gpt2cli[plot]'" in done.output
    )
