"""`gpt2 train --eval-task` and `--sample-every`: what they write, and that a run's losses,
resumed or not, are the same with them as without them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import cli as gpt2
from tests.helpers_train import FIXTURES, isolate, losses, write_corpus

TASK = FIXTURES / "tasks" / "choices.jsonl"
FLAGS = ("--init", "tiny", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
         "--batch-size", "2", "--seq-length", "16", "--log-every", "1", "--save-every", "2",
         "--eval-every", "2", "--warmup", "1", "--decay-steps", "4")  # fmt: skip
PROBES = ("--eval-task", str(TASK), "--sample-every", "2", "--sample-tokens", "4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run of 4 steps with probes and without, and its first 2 steps with probes:
    (folder, output) of each."""
    root = tmp_path_factory.mktemp("runs")
    corpus = write_corpus(root / "corpus.txt")
    out = {}
    for name, steps, extra in (("probed", 4, PROBES), ("plain", 4, ()), ("short", 2, PROBES)):
        where = ("--steps", str(steps), "--out", str(root / name))
        done = gpt2("train", "--dataset", str(corpus), *FLAGS, *extra, *where)
        assert done.exit_code == 0, done.output
        out[name] = (root / name, done.output)
    return out


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)


def records(run: Path) -> dict[int, dict]:
    """step -> its metrics records merged into one."""
    merged: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        merged.setdefault(record["step"], {}).update(record)
    return merged


def without_speed(run: Path) -> dict[int, dict]:
    """A run's records without tokens_per_s, the one field that differs from run to run."""
    return {
        step: {k: v for k, v in record.items() if k != "tokens_per_s"}
        for step, record in records(run).items()
    }


def eval_task(model: Path) -> dict:
    done = gpt2("eval", "-m", str(model), "--task", str(TASK), "--json")
    assert done.exit_code == 0, done.output
    return json.loads(done.output.splitlines()[-1])


def test_task_accuracy_at_each_evaluation_equals_gpt2_eval_on_that_step(runs):
    run, _ = runs["probed"]
    got = records(run)
    assert [s for s in got if "task_acc" in got[s]] == [2, 4]
    assert all("val_loss" in got[s] for s in (2, 4))  # beside the validation loss
    # a checkpoint is no model file: the short run's is the same weights at step 2
    for step, model in ((2, runs["short"][0] / "final.npz"), (4, run / "final.npz")):
        expected = eval_task(model)
        assert got[step]["task_acc"] == expected["acc"]
        assert got[step]["task_acc_norm"] == expected["acc_norm"]


def test_samples_go_to_the_log_and_the_metrics(runs):
    run, output = runs["probed"]
    got = records(run)
    assert [s for s in got if "sample" in got[s]] == [2, 4]
    for step in (2, 4):
        assert isinstance(got[step]["sample"], str)
        assert f"step {step} sample: {json.dumps(got[step]['sample'])}" in output
    assert "acc_norm" in output  # the progress line


def test_a_run_without_probes_writes_none_of_their_fields(runs):
    run, output = runs["plain"]
    assert not any({"task_acc", "sample"} & set(r) for r in records(run).values())
    assert "sample:" not in output


def test_probes_change_no_loss_and_a_resumed_run_repeats_them(tmp_path, runs):
    probed, _ = runs["probed"]
    plain, _ = runs["plain"]
    assert losses(probed) == losses(plain)
    resumed = shutil.copytree(runs["short"][0], tmp_path / "resumed")
    done = gpt2("train", "--resume", str(resumed), "--steps", "4")
    assert done.exit_code == 0, done.output
    assert without_speed(resumed) == without_speed(probed)  # losses, task and samples


def test_a_bad_task_file_stops_the_run_before_it_trains(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": [" b", " c"], "answer": 0}\n{"context": "a"}\n')
    corpus = write_corpus(tmp_path / "corpus.txt")
    done = gpt2("train", "--dataset", str(corpus), *FLAGS, "--eval-task", str(bad), "--out", "run")
    assert done.exit_code == 1
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:2: missing 'choices'" in lines[0], done.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_sample_longer_than_the_context_stops_the_run_before_it_trains(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    done = gpt2(
        "train", "--dataset", str(corpus), *FLAGS, "--sample-every", "1",
        "--sample-tokens", "500", "--out", "run",
    )  # fmt: skip
    assert done.exit_code == 1
    assert done.output.strip() == (
        "error: --sample-prompt and --sample-tokens: max new tokens (500) must be below the "
        "model's context window of 128 tokens"
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_run_json_from_before_these_settings_resumes_with_their_defaults(tmp_path, runs):
    resumed = shutil.copytree(runs["plain"][0], tmp_path / "older")
    spec = json.loads((resumed / "run.json").read_text())
    for name in ("eval_task", "sample_every", "sample_prompt", "sample_tokens"):
        del spec["settings"][name]
    (resumed / "run.json").write_text(json.dumps(spec))
    (resumed / "ckpt-0000004.npz").unlink()
    done = gpt2("train", "--resume", str(resumed), "--force")
    assert done.exit_code == 0, done.output
    assert without_speed(resumed) == without_speed(runs["plain"][0])
    del spec["settings"]["lr"]  # a setting that fixes the run's numbers stays required
    (resumed / "run.json").write_text(json.dumps(spec))
    done = gpt2("train", "--resume", str(resumed), "--steps", "5")
    assert done.exit_code == 1 and "settings.lr is missing" in done.output, done.output
