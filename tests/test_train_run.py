"""The run driver's checks before the first step: the memory line and a run that cannot fit."""

from __future__ import annotations

import pytest

from gpt2cli.config import preset
from gpt2cli.training.memory import footprint
from tests.conftest import cli as gpt2_in_process
from tests.helpers_train import isolate, write_corpus


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)


def test_footprint_counts_weights_adam_and_activations():
    gpt2 = preset("gpt2")
    need = footprint(gpt2, rows=8, seq=1024, compute_bytes=4)
    assert need.params == 4 * gpt2.num_params() and need.optimizer == 2 * need.params
    assert need.gradients == need.params
    per_layer = 8 * 1024 * (34 * 768 + 5 * 12 * 1024) * 2
    assert need.activations == 12 * per_layer + 8 * 1024 * 50257 * 8
    half = footprint(gpt2, rows=8, seq=1024, compute_bytes=2, remat=True)
    assert half.activations < need.activations / 4  # remat keeps one block's activations
    assert footprint(gpt2, rows=8, seq=1024, compute_bytes=4, shards=4).params == need.params // 4


def test_a_run_that_cannot_fit_ends_in_one_line_before_any_work(tmp_path, monkeypatch):
    from gpt2cli.training import memory

    monkeypatch.setattr(memory, "host_available", lambda: 10**8)  # 0.1 GB
    corpus = write_corpus(tmp_path / "c.txt", lines=30)
    done = gpt2_in_process("train", "-d", str(corpus), "--init", "tiny", "--batch-size", "64",
                           "--out", "big")  # fmt: skip
    assert done.exit_code == 1
    assert len(done.output.strip().splitlines()) == 1, done.output
    assert "this run needs at least" in done.output and "--batch-size (now 64)" in done.output
    assert "--dtype bfloat16" in done.output and "--remat" in done.output
    assert "0.1 GB (available host memory)" in done.output
    assert not (tmp_path / "big").exists()
