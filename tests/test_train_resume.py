"""Resume is exact and checkpoints are never half-written: real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from gpt2cli.training.run_folder import RunFolder, load_checkpoint
from tests.conftest import gpt2_exe
from tests.helpers_train import TINY_A, losses, write_corpus

pytestmark = pytest.mark.slow

FAST_COMPILE = "--xla_backend_optimization_level=0"  # tiny models: compile time dominates
# On a GPU two processes may pick different GEMM algorithms (autotuning times them) and add the
# embedding's gradient with atomics, so their losses would part in the last bits; these flags
# make a GPU repeat itself as a CPU does. (A CPU accepts and ignores them.)
SAME_KERNELS = "--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0"
STEPS = 40  # the resumed run stops here; the interrupted one was started for 1000
COMMON = (
    "--model", str(TINY_A), "--batch-size", "2", "--seq-length", "16", "--log-every", "1",
    "--lr", "1e-3", "--warmup", "10", "--decay-steps", "1000", "--save-every", "20",
    "--val-fraction", "0"
)  # fmt: skip


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sigint_saves_and_resume_repeats_the_uninterrupted_losses(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPT2_CACHE_DIR": str(tmp_path / "cache"),
           "XLA_FLAGS": f"{FAST_COMPILE} {SAME_KERNELS}", "GPT2_NO_COMPILE_CACHE": "1"}  # fmt: skip
    train = [gpt2_exe(), "train", "--dataset", str(corpus), *COMMON]
    # the uninterrupted run, in the same environment, alongside
    whole = subprocess.Popen([*train, "--steps", str(STEPS), "--out", "whole"], cwd=tmp_path,
                             env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    proc = subprocess.Popen([*train, "--steps", "1000", "--out", "stopped"], cwd=tmp_path,
                            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    stopped_at = max(losses(tmp_path / "stopped"))
    assert 2 <= stopped_at < STEPS
    assert f"stopped at step {stopped_at} of 1000" in stderr
    assert "gpt2 train --resume stopped" in stderr
    assert RunFolder(tmp_path / "stopped").latest()[0] == stopped_at

    resume = [gpt2_exe(), "train", "--resume", "stopped", "--steps", str(STEPS)]
    resumed = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "stopped" / "final.npz").is_file()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "stopped")
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - expected[s]) for s in expected) <= 1e-6
    assert expected[STEPS] < expected[1] - 0.3  # the run really trained


SAVER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from gpt2cli.config import preset
    from gpt2cli.training.run_folder import RunFolder

    folder = RunFolder(sys.argv[1])
    params = {"w": np.ones((64, 64), np.float32)}
    opt = [np.zeros((64, 64), np.float32), np.zeros((64, 64), np.float32)]
    folder.save(1, preset("tiny"), params, opt, keep=3)

    def slow_savez(f, **arrays):  # write part of the file, then hang
        f.write(b"PK\\x03\\x04" + bytes(1000))
        f.flush()
        print("writing", flush=True)
        time.sleep(120)

    np.savez = slow_savez
    folder.save(2, preset("tiny"), {"w": params["w"] * 2}, opt, keep=3)
    """
)


def test_kill_9_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    folder = RunFolder(tmp_path)
    assert list(tmp_path.glob(".ckpt-0000002.npz.*.tmp"))  # the half-written file
    assert folder.latest() == (1, tmp_path / "ckpt-0000001.npz")
    import numpy as np

    like = {"w": np.zeros((64, 64), np.float32)}
    step, params, opt = load_checkpoint(folder.latest()[1], like, [like["w"], like["w"]])
    assert step == 1 and float(params["w"].sum()) == 64 * 64
    folder.remove_partial()
    assert not list(tmp_path.glob(".ckpt-*"))
