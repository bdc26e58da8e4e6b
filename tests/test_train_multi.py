"""More than one device (data parallel, FSDP) and more than one process (jax.distributed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.helpers_train import TINY_A, losses, write_corpus

pytestmark = pytest.mark.slow

FAST_COMPILE = "--xla_backend_optimization_level=0"  # tiny models: compile time dominates

MODES = textwrap.dedent(
    """
    import contextlib, dataclasses, json, sys
    import jax
    from pathlib import Path
    from gpt2cli.training import data
    from gpt2cli.hub import load_model
    from gpt2cli.tokenizer import bundled
    from gpt2cli.training.plan import train_config_for
    from gpt2cli.training.trainer import Trainer
    from gpt2cli.training.loop import LoopSettings, TrainData, train_loop

    config, params = load_model(sys.argv[1])
    blocks, _ = data.split(data.load_tokens([Path(sys.argv[2])], bundled()), 16, 0.0)
    out = {"devices": jax.device_count()}
    single = train_config_for(config, batch_size=4, seq_length=16, lr=1e-2, min_lr=3e-5,
                              warmup=0, decay_steps=4)
    for mode in ("single", "data-parallel", "fsdp"):
        tc = dataclasses.replace(single, parallel=mode)
        trainer = Trainer(config, tc)
        logged = []
        hooks = type("H", (), {"on_log": lambda self, r: logged.append(r["loss"]),
                               "on_save": lambda self, s, k: None,
                               "measure": lambda self, p, k, e: {},
                               "compiling": lambda self, what: contextlib.nullcontext()})()
        train_data = TrainData(blocks, None, data.Sampler(len(blocks), 0), 4, 1)
        state, _ = train_loop(trainer, trainer.create_state(params), train_data,
                              LoopSettings(steps=4, log_every=1), hooks)
        kernel = state.params["h_0"]["mlp"]["c_fc"]["kernel"]  # [16, 64]
        mu = state.opt_state[1][0].mu["h_0"]["mlp"]["c_fc"]["kernel"]
        out[mode] = {
            "losses": logged,
            "kernel_spec": list(kernel.sharding.spec),
            "kernel_shard": list(kernel.addressable_shards[0].data.shape),
            "mu_shard": list(mu.addressable_shards[0].data.shape),
            "kernel_devices": len(kernel.sharding.device_set),
            "wte_shard": list(state.params["wte"]["embedding"].addressable_shards[0].data.shape),
        }
    print(json.dumps(out))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run, side by side: the three modes on 4 devices, and a 2-process CLI run."""
    tmp = tmp_path_factory.mktemp("multi")
    corpus = write_corpus(tmp / "corpus.txt")
    env = {**os.environ, "GPT2_CACHE_DIR": str(tmp / "cache"), "HF_HUB_OFFLINE": "1",
           "GPT2_NO_COMPILE_CACHE": "1"}  # fmt: skip
    env["JAX_PLATFORMS"] = "cpu"  # 4 emulated host devices, also on a machine with a GPU
    four = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}"}
    modes = subprocess.Popen([sys.executable, "-c", MODES, str(TINY_A), str(corpus)], env=four,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    # the same settings as MODES's TrainConfig
    train = [
        sys.executable, "-c", "from gpt2cli.cli.app import main; main()", "train",
        "--dataset", str(corpus), "-m", str(TINY_A), "--steps", "4", "--batch-size", "4",
        "--seq-length", "16", "--log-every", "1", "--lr", "1e-2", "--min-lr", "3e-5",
        "--warmup", "0", "--decay-steps", "4", "--val-fraction", "0", "--out", str(tmp / "multi"),
        "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2",
    ]  # fmt: skip
    one = {**env, "XLA_FLAGS": FAST_COMPILE}
    procs = [
        subprocess.Popen(
            [*train, "--process-id", str(i)],
            env=one,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    out, err = modes.communicate(timeout=300)
    assert modes.returncode == 0, err
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return json.loads(out), tmp / "multi"


def test_data_parallel_and_fsdp_match_one_device(runs):
    out, _ = runs
    assert out["devices"] == 4
    single = out["single"]["losses"]
    assert len(single) == 4 and single[3] < single[0]
    for mode in ("data-parallel", "fsdp"):
        assert out[mode]["losses"] == pytest.approx(single, abs=1e-5)
    assert out["single"]["kernel_devices"] == 1
    dp = out["data-parallel"]
    assert dp["kernel_devices"] == 4 and dp["kernel_shard"] == [16, 64]  # replicated
    fsdp = out["fsdp"]
    assert fsdp["kernel_spec"] == [None, "data"]
    assert fsdp["kernel_shard"] == [16, 16] and fsdp["mu_shard"] == [16, 16]  # a quarter each
    assert fsdp["wte_shard"] == [50257, 4]  # 50257 rows do not split by 4: columns do


def test_two_processes_train_like_one(runs):
    out, run_dir = runs
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["settings"]["num_processes"] == 2  # so the two train data-parallel
    multi = losses(run_dir)
    assert sorted(multi) == [1, 2, 3, 4]
    assert [multi[s] for s in range(1, 5)] == pytest.approx(out["single"]["losses"], abs=1e-5)
    assert (run_dir / "final.npz").is_file()  # written once, by process 0
