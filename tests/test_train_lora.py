"""`gpt2 train --lora`: only the adapters train, checkpoints hold only them, resume is exact,
the memory estimate counts a frozen model, and wrong settings stop before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from gpt2cli import lora
from gpt2cli.adapter import WEIGHTS_FILE, load_adapter
from gpt2cli.checkpoint import flatten
from gpt2cli.config import preset
from gpt2cli.training.memory import footprint
from gpt2cli.training.plan import train_config_for
from gpt2cli.training.trainer import Trainer
from tests.conftest import cli
from tests.helpers_train import TINY_A, isolate, losses, write_corpus


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)


def test_steps_change_only_the_adapters(tiny_b):
    config, params = tiny_b
    tc = train_config_for(
        config, batch_size=2, seq_length=16, lr=1e-2, warmup=0, decay_steps=3, lora=True,
        lora_rank=2, lora_targets=["c_attn", "mlp.c_proj"], lora_dropout=0.1,
    )  # fmt: skip
    assert tc.lora == lora.LoraSpec(2, 2.0, 0.1, ("attn.c_attn", "mlp.c_proj"))
    trainer = Trainer(config, tc)
    state = trainer.fresh_state(params)
    before = {k: np.array(v, copy=True) for k, v in flatten(jax.device_get(state.params)).items()}
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 2, 17), np.int32)
    for _ in range(3):
        state, metrics = trainer.step(state, tokens)
    assert np.isfinite(float(metrics["loss"]))
    base = flatten(jax.device_get(trainer.base))
    assert set(base) == set(flatten(params))
    for name, value in flatten(params).items():  # the frozen model: bit for bit
        np.testing.assert_array_equal(base[name], value)
    after = flatten(jax.device_get(state.params))
    assert set(after) == set(lora.adapter_shapes(config, tc.lora))
    for name, value in after.items():
        assert not np.array_equal(value, before[name]), name
    # AdamW's moments exist for the adapters only: no leaf is larger than an adapter array
    biggest = max(a.size for a in after.values())
    assert max(np.size(leaf) for leaf in jax.tree.leaves(state.opt_state)) == biggest


def test_bfloat16_keeps_the_frozen_model_in_bfloat16(tiny_b):
    config, params = tiny_b
    tc = train_config_for(
        config, batch_size=2, seq_length=16, lora=True, dtype="bfloat16", warmup=0
    )
    trainer = Trainer(config, tc)
    on_device = jax.tree.map(jax.numpy.asarray, params)  # as --init makes them: moved, not copied
    state = trainer.fresh_state(on_device)
    assert {a.dtype for a in jax.tree.leaves(trainer.base)} == {np.dtype("bfloat16")}
    assert {a.dtype for a in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    kernel = params["h_0"]["attn"]["c_attn"]["kernel"]
    stored = np.asarray(trainer.base["h_0"]["attn"]["c_attn"]["kernel"])
    np.testing.assert_array_equal(stored, kernel.astype(stored.dtype))


COMMON = (
    "-m", str(TINY_A), "--lora", "--lora-rank", "2", "--lora-dropout", "0.1",
    "--lora-targets", "c_attn", "--lora-targets", "mlp.c_fc", "--batch-size", "2",
    "--seq-length", "16", "--log-every", "1", "--lr", "1e-2", "--warmup", "0",
    "--decay-steps", "6", "--val-fraction", "0", "--save-every", "3",
)  # fmt: skip


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_repeats_the_uninterrupted_run_and_writes_the_same_adapter(tmp_path):
    corpus = str(write_corpus(tmp_path / "c.txt", lines=60))
    whole = cli("train", "-d", corpus, *COMMON, "--steps", "6", "--out", "whole",
                "--sample-every", "6", "--sample-tokens", "4")  # fmt: skip
    assert whole.exit_code == 0, whole.output
    part = cli("train", "-d", corpus, *COMMON, "--steps", "3", "--out", "part")
    assert part.exit_code == 0, part.output
    resumed = cli("train", "--resume", "part", "--steps", "6")
    assert resumed.exit_code == 0, resumed.output
    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "part")
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    assert max(abs(got[s] - expected[s]) for s in expected) <= 1e-6
    a, b = (load_file(tmp_path / run / "adapter" / WEIGHTS_FILE) for run in ("whole", "part"))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not (tmp_path / "whole" / "final.npz").exists()  # the adapter is the result
    sampled = [r for r in metrics(tmp_path / "whole") if "sample" in r]  # the merged model runs
    assert [r["step"] for r in sampled] == [6] and isinstance(sampled[0]["sample"], str)
    spec, _ = load_adapter(tmp_path / "whole" / "adapter")
    assert spec == lora.LoraSpec(2, 2.0, 0.1, ("attn.c_attn", "mlp.c_fc"))
    ckpt = tmp_path / "whole" / "ckpt-0000006.npz"
    with np.load(ckpt, allow_pickle=False) as data:
        params = [k for k in data.files if k.startswith("params/")]
    assert params and all(k.rsplit("/", 1)[1] in ("lora_a", "lora_b") for k in params)
    assert ckpt.stat().st_size < 50_000  # the model (3 MB) is not in it


def test_print_config_shows_the_lora_settings(tmp_path):
    corpus = str(write_corpus(tmp_path / "c.txt", lines=30))
    done = cli("train", "-d", corpus, "--init", "tiny", "--lora", "--lora-rank", "4",
               "--print-config")  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "\nlora = true" in done.output and "\nlora-rank = 4" in done.output
    assert '\nlora-targets = ["c_attn"]' in done.output
    assert "\n# lora-alpha = 4.0  # derived" in done.output  # the rank: scale 1
    assert "\n# lr = 0.0002  # derived" in done.output  # LoRA's default rate


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora", "--lora-rank", "0"], "--lora-rank: must be at least 1, got 0"),
        (["--lora", "--lora-rank", "17"], "--lora-rank 17 is wider than attn.c_attn (16)"),
        (["--lora", "--lora-targets", "q_proj"], "--lora-targets 'q_proj' names no layer"),
        (["--lora", "--lora-dropout", "1"], "--lora-dropout: must be in [0, 1), got 1.0"),
        (["--lora-rank", "4"], "--lora-rank only applies with --lora"),
        (
            ["--lora", "--output", "a.npz"],
            "--output a.npz is a file name; --lora writes an adapter",
        ),
    ],
)
def test_wrong_lora_settings_are_one_line_and_write_nothing(tmp_path, flags, message):
    corpus = str(write_corpus(tmp_path / "c.txt", lines=30))
    done = cli("train", "-d", corpus, "-m", str(TINY_A), *flags, "--steps", "2", "--out", "run")
    lines = done.output.strip().splitlines()
    assert message in lines[-1], done.output
    if done.exit_code == 2:  # a usage error, caught as the flags are parsed: Usage, then error
        assert len(lines) == 2 and lines[0].startswith("Usage:")
    else:
        assert done.exit_code == 1 and len(lines) == 1, done.output
    assert not (tmp_path / "run").exists()


def test_memory_estimate_counts_a_frozen_model():
    xl = preset("gpt2-xl")
    spec = lora.LoraSpec(16, 16.0)
    full = footprint(xl, rows=1, seq=256, compute_bytes=4)
    adapted = footprint(xl, rows=1, seq=256, compute_bytes=4, trained=lora.count(spec, xl))
    assert full.total > 24e9 and full.optimizer == 8 * xl.num_params()  # AdamW cannot fit
    assert adapted.params == 4 * xl.num_params() + 4 * lora.count(spec, xl)
    assert adapted.optimizer == 8 * lora.count(spec, xl) < 0.1e9
    assert adapted.total < 10e9
    half = footprint(xl, rows=1, seq=256, compute_bytes=2, trained=lora.count(spec, xl))
    assert half.params < adapted.params / 1.9  # the frozen model in bfloat16


@pytest.mark.parametrize("have", [15 * 10**6, 10 * 10**6])
def test_a_full_fine_tune_that_cannot_fit_suggests_lora(tmp_path, monkeypatch, have):
    from gpt2cli.training import memory

    # tiny-a at 1 x 16 tokens: full AdamW needs ~19 MB (13 MB of it weights, moments and
    # gradients: all of 10 MB could not hold them, as gpt2-xl's 25 GB on 24 GB), LoRA ~10 MB
    monkeypatch.setattr(memory, "host_available", lambda: have)
    corpus = str(write_corpus(tmp_path / "c.txt", lines=30))
    done = cli("train", "-d", corpus, "-m", str(TINY_A), "--batch-size", "1",
               "--seq-length", "16", "--steps", "1", "--out", "big")  # fmt: skip
    assert done.exit_code == 1 and len(done.output.strip().splitlines()) == 1, done.output
    assert "try --lora (train adapters on the frozen model, not every weight)" in done.output
    assert not (tmp_path / "big").exists()


LORA_MODES = textwrap.dedent(
    """
    import dataclasses, json, sys
    import jax, numpy as np
    from gpt2cli.hub import load_model
    from gpt2cli.training.plan import train_config_for
    from gpt2cli.training.trainer import Trainer

    config, params = load_model(sys.argv[1])
    tokens = np.random.default_rng(0).integers(0, 50257, (1, 4, 17), np.int32)
    single = train_config_for(config, batch_size=4, seq_length=16, lr=1e-2, warmup=0,
                              decay_steps=3, lora=True, lora_rank=2)
    out = {}
    for mode in ("single", "data-parallel", "fsdp"):
        trainer = Trainer(config, dataclasses.replace(single, parallel=mode))
        state = trainer.fresh_state(params)
        losses = []
        for _ in range(3):
            state, metrics = trainer.step(state, tokens)
            losses.append(float(metrics["loss"]))
        kernel = trainer.base["h_0"]["mlp"]["c_fc"]["kernel"]  # [16, 64]
        b = state.params["h_0"]["attn"]["c_attn"]["lora_b"]  # [2, 48]
        out[mode] = {"losses": losses, "devices": len(b.sharding.device_set),
                     "kernel_shard": list(kernel.addressable_shards[0].data.shape),
                     "b_shard": list(b.addressable_shards[0].data.shape)}
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_lora_trains_alike_on_one_device_data_parallel_and_fsdp(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GPT2_NO_COMPILE_CACHE": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                        "--xla_backend_optimization_level=0"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", LORA_MODES, str(TINY_A)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    single = out["single"]["losses"]
    assert abs(single[2] - single[0]) > 1e-3  # the adapters moved (random tokens: up or down)
    for mode in ("data-parallel", "fsdp"):
        assert out[mode]["losses"] == pytest.approx(single, abs=1e-5)
        assert out[mode]["devices"] == 4 and out[mode]["b_shard"] == [2, 48]  # replicated
    assert out["data-parallel"]["kernel_shard"] == [16, 64]
    assert out["fsdp"]["kernel_shard"] == [16, 16]  # the frozen model is sharded
