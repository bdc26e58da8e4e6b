"""Nothing a training run writes is lost or shared: resume paths, the run lock, SIGTERM,
non-finite settings and failed starts (issue 12, items 1-4)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from gpt2cli.training.run_folder import RunFolder
from tests.conftest import cli, gpt2_exe
from tests.helpers_train import TINY_A, write_corpus

SMALL = ("-m", str(TINY_A), "--batch-size", "2", "--seq-length", "16", "--dtype", "bfloat16")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT2_NO_COMPILE_CACHE", "1")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def train(corpus, *args: str):
    return cli("train", "--dataset", str(corpus), *SMALL, *args)


def test_resuming_a_copied_run_writes_into_the_copy(tmp_path, corpus):
    done = train(corpus, "--steps", "2", "--save-every", "1", "--out", "runA")
    assert done.exit_code == 0, done.output
    original = (tmp_path / "runA/final.npz").read_bytes()
    shutil.copytree(tmp_path / "runA", tmp_path / "branch")
    (tmp_path / "branch/final.npz").unlink()
    done = cli("train", "--resume", "branch", "--steps", "3")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "branch/final.npz").is_file()
    assert (tmp_path / "runA/final.npz").read_bytes() == original
    assert not (tmp_path / "runA/ckpt-0000003.npz").exists()


def test_resume_never_overwrites_an_output_outside_its_folder(tmp_path, corpus):
    """A run.json of an older gpt2 names its output by absolute path: a copy would write there."""
    done = train(corpus, "--steps", "1", "--out", "runA")
    assert done.exit_code == 0, done.output
    shutil.copytree(tmp_path / "runA", tmp_path / "branch")
    spec = json.loads((tmp_path / "branch/run.json").read_text())
    spec["output"] = str(tmp_path / "runA/final.npz")
    (tmp_path / "branch/run.json").write_text(json.dumps(spec))
    before = (tmp_path / "runA/final.npz").read_bytes()
    done = cli("train", "--resume", "branch", "--steps", "2")
    assert done.exit_code == 1
    assert "outside branch, and that file exists" in done.output
    assert "--force" in done.output
    assert (tmp_path / "runA/final.npz").read_bytes() == before


def test_a_run_folder_in_use_refuses_a_second_process(tmp_path, corpus):
    done = train(corpus, "--steps", "1", "--out", "runA")
    assert done.exit_code == 0, done.output
    assert not (tmp_path / "runA/.lock").exists()  # released at the end
    (tmp_path / "runB").mkdir()  # a new run that another process has just started
    held = [RunFolder(tmp_path / name).lock() for name in ("runA", "runB")]
    try:
        for name, args in (("runA", ["--resume", "runA", "--steps", "2"]),
                           ("runB", ["--dataset", str(corpus), *SMALL, "--steps", "1",
                                     "--out", "runB"])):  # fmt: skip
            done = cli("train", *args)
            assert done.exit_code == 1
            assert f"{name} is in use by another gpt2 train (pid {os.getpid()} on" in done.output
            assert len(done.output.strip().splitlines()) == 1, done.output
    finally:
        for lock in held:
            lock.release()
    assert sorted(p.name for p in (tmp_path / "runA").glob("ckpt-*")) == ["ckpt-0000001.npz"]
    assert not list((tmp_path / "runB").iterdir())
    done = cli("train", "--resume", "runA", "--steps", "2")
    assert done.exit_code == 0, done.output


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path, corpus):
    done = train(corpus, "--steps", "1", "--out", "runA")
    assert done.exit_code == 0, done.output
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (tmp_path / "runA/.lock").write_text(f"pid {dead} on elsewhere\n")  # as kill -9 leaves it
    done = cli("train", "--resume", "runA", "--steps", "2")
    assert done.exit_code == 0, done.output


@pytest.mark.parametrize(
    "args",
    [
        ["--lr", "nan"],
        ["--lr", "inf"],
        ["--min-lr", "nan"],
        ["--weight-decay", "nan"],
        ["--grad-clip", "nan"],
        ["--dropout", "-inf"],
        ["--val-fraction", "nan"],
    ],
)
def test_non_finite_settings_are_usage_errors_that_write_nothing(tmp_path, corpus, args):
    done = train(corpus, "--steps", "1", "--out", "run", *args)
    assert done.exit_code == 2, done.output
    assert f"Invalid value for {args[0]}: {args[1]} is not a finite number" in done.output
    assert not (tmp_path / "run").exists()


def test_a_start_that_dies_before_its_first_checkpoint_does_not_block_its_retry(tmp_path, corpus):
    done = train(corpus, "--steps", "3", "--out", "run", "--lr", "1e30", "--grad-clip", "0")
    assert done.exit_code == 1
    assert "no checkpoint was saved" in done.output
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # what kill -9 before the first save leaves
    (tmp_path / "run/run.json").write_text("{}")
    (tmp_path / "run/metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n')
    done = train(corpus, "--steps", "1", "--out", "run")
    assert done.exit_code == 0, done.output
    assert [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").open()] == [1]


def test_a_metrics_line_cut_short_by_a_crash_is_dropped_on_resume(tmp_path, corpus):
    done = train(corpus, "--steps", "2", "--log-every", "1", "--out", "run")
    assert done.exit_code == 0, done.output
    with open(tmp_path / "run/metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # kill -9 in the middle of an append
    done = cli("train", "--resume", "run", "--steps", "3", "--log-every", "1")
    assert done.exit_code == 0, done.output
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").open()]
    assert steps == [1, 2, 3]


def test_run_json_is_strict_json(tmp_path, corpus):
    done = train(corpus, "--steps", "1", "--out", "run", "--grad-clip", "0.5")
    assert done.exit_code == 0, done.output
    text = (tmp_path / "run/run.json").read_text()
    assert json.loads(text, parse_constant=pytest.fail)["settings"]["grad_clip"] == 0.5


@pytest.mark.slow
def test_sigterm_saves_like_ctrl_c(tmp_path, corpus):
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.Popen([gpt2_exe(), "train", "--dataset", str(corpus), *SMALL, "--steps",
                             "100000", "--log-every", "1", "--out", "run"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "run/metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    stopped = max(json.loads(line)["step"] for line in metrics.open())
    assert RunFolder(tmp_path / "run").latest()[0] == stopped
    assert "SIGTERM: finishing this step and saving" in stderr
    assert "Continue with: gpt2 train --resume run" in stderr
