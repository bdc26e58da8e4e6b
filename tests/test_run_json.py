"""run.json across versions: a folder made by an older gpt2 resumes with the same losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import cli as gpt2
from tests.helpers_train import isolate, losses, write_corpus

# Made by gpt2 at 99fc8f4 (run.json version 1), with the corpus at {ROOT}/corpus.txt:
#   gpt2 train --dataset {ROOT}/corpus.txt --init tiny --n-layer 2 --n-embd 32 --n-head 2
#     --batch-size 2 --seq-length 16 --steps 4 --save-every 2 --log-every 1 --out {ROOT}/run
VERSION_1 = Path(__file__).parent / "fixtures/run-v1/run.json"
FLAGS = ("--init", "tiny", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
         "--batch-size", "2", "--seq-length", "16", "--save-every", "2", "--log-every", "1")  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The fixture's run, made by this gpt2 from start to end: its folder."""
    root = tmp_path_factory.mktemp("fresh")
    corpus = write_corpus(root / "corpus.txt")
    done = gpt2(
        "train", "--dataset", str(corpus), *FLAGS, "--steps", "4", "--out", str(root / "run")
    )
    assert done.exit_code == 0, done.output
    return root / "run"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)


def version_1_folder(root: Path, uninterrupted: Path, without_settings: bool = False) -> Path:
    """The run stopped at step 2, as the old gpt2 left it (checkpoints did not change)."""
    write_corpus(root / "corpus.txt")
    (root / "run").mkdir()
    spec = json.loads(VERSION_1.read_text().replace("{ROOT}", str(root)))
    if without_settings:  # as gpt2 wrote it before runs recorded their settings
        del spec["settings"]
    (root / "run/run.json").write_text(json.dumps(spec))
    shutil.copy(uninterrupted / "ckpt-0000002.npz", root / "run")
    return root / "run"


@pytest.mark.parametrize("without_settings", [False, True])
def test_a_version_1_run_resumes_with_the_same_losses(tmp_path, uninterrupted, without_settings):
    run = version_1_folder(tmp_path, uninterrupted, without_settings)
    done = gpt2("train", "--resume", "run")
    assert done.exit_code == 0, done.output
    resumed, fresh = losses(run), losses(uninterrupted)
    assert sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == [fresh[s] for s in (3, 4)]
    spec = json.loads((run / "run.json").read_text())
    assert spec["version"] == 2 and spec["output"] == "final.npz"
    same = json.loads((uninterrupted / "run.json").read_text())["settings"]
    same["dataset"] = [str(tmp_path / "corpus.txt")]
    if without_settings:  # the shape flags were not recorded: model_config holds the shape
        same.update(n_layer=None, n_embd=None, n_head=None)
    assert spec["settings"] == same


def test_version_2_stores_each_setting_once(uninterrupted):
    spec = json.loads((uninterrupted / "run.json").read_text())
    assert set(spec) == {"format", "version", "settings", "model_config", "data", "output"}
    assert "out" not in spec["settings"] and "output" not in spec["settings"]
    assert set(spec["data"]) == {"dataset", "val_dataset", "prepared", "token_hash"}


def test_a_version_1_run_keeps_its_settings_on_resume(tmp_path, uninterrupted):
    version_1_folder(tmp_path, uninterrupted)
    done = gpt2("train", "--resume", "run", "--lr", "0.5")
    assert done.exit_code == 1
    assert "--lr cannot be combined with --resume" in done.output


@pytest.mark.parametrize("version", [None, 3])
def test_a_run_json_of_an_unknown_version_is_one_line(tmp_path, uninterrupted, version):
    shutil.copytree(uninterrupted, tmp_path / "run")
    spec = json.loads((tmp_path / "run/run.json").read_text())
    spec["version"] = version
    (tmp_path / "run/run.json").write_text(json.dumps(spec))
    done = gpt2("train", "--resume", "run")
    assert done.exit_code == 1
    assert (
        f"run.json is version {version} of 'gpt2cli-run'; this gpt2 reads version 2" in done.output
    )
    assert len(done.output.strip().splitlines()) == 1, done.output


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("beta2", 1.5, "must be in [0, 1), got 1.5"),
        ("batch_size", 0, "must be at least 1, got 0"),
        ("steps", 2**31, "must be at most 2147483647, got 2147483648"),
    ],
)
def test_a_run_json_setting_out_of_range_is_one_line_naming_it(
    tmp_path, uninterrupted, name, value, problem
):
    shutil.copytree(uninterrupted, tmp_path / "run")
    spec = json.loads((tmp_path / "run/run.json").read_text())
    spec["settings"][name] = value
    (tmp_path / "run/run.json").write_text(json.dumps(spec))
    done = gpt2("train", "--resume", "run")
    assert done.exit_code == 1
    assert done.output.strip() == f"error: run/run.json: settings.{name} {problem}"


def test_a_resume_with_a_process_id_beyond_the_process_count_is_a_usage_error(
    tmp_path, uninterrupted
):
    shutil.copytree(uninterrupted, tmp_path / "run")
    done = gpt2("train", "--resume", "run", "--steps", "5", "--process-id", "5")
    assert done.exit_code == 2
    assert "Invalid value for --process-id: must be below the process count (1), got 5" in (
        done.output
    )
