"""`gpt2 eval --task` and the scoring core against transformers' log-probabilities
(tests/fixtures/score.json, made by scripts/make_score_fixtures.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt2cli.errors import UserError
from gpt2cli.scoring import Scorer, length_buckets
from gpt2cli.tokenizer import from_folder
from gpt2cli.training import tasks
from tests.conftest import FIXTURES, TINY_A, cli

TASKS = FIXTURES / "tasks"


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
    monkeypatch.setenv("GPT2_NO_COMPILE_CACHE", "1")


@pytest.fixture(scope="module")
def score_golden() -> dict:
    return json.loads((FIXTURES / "score.json").read_text())


@pytest.fixture(scope="module")
def scorer(tiny_a) -> Scorer:
    config, params = tiny_a
    return Scorer(config, params, batch_tokens=256)


def expected(golden_items: list[dict]) -> tuple[list[float], list[float]]:
    """acc and acc_norm per item, summed by hand from the golden log-probabilities."""
    acc, acc_norm = [], []
    for item in golden_items:
        sums = [sum(c["logprobs"]) for c in item["choices"]]
        norm = [s / n for s, n in zip(sums, item["lengths"], strict=True)]
        acc.append(float(int(np.argmax(sums)) == item["answer"]))
        acc_norm.append(float(int(np.argmax(norm)) == item["answer"]))
    return acc, acc_norm


def test_length_buckets_waste_at_most_a_third():
    assert length_buckets(128) == [16, 24, 32, 48, 64, 96, 128]
    assert length_buckets(1024)[-3:] == [512, 768, 1024]


def test_scorer_equals_transformers_in_any_batch(scorer, score_golden):
    prompts = [p for p in score_golden["prompts"] if len(p["ids"]) > 1]
    together = scorer([p["ids"] for p in prompts], top=5)
    for p, got in zip(prompts, together, strict=True):
        alone = scorer([p["ids"]])[0]
        np.testing.assert_allclose(got.logprobs, p["logprobs"], atol=1e-5)
        np.testing.assert_allclose(alone.logprobs, got.logprobs, atol=1e-6)
        np.testing.assert_allclose(got.top_logprobs, p["top_logprobs"], atol=1e-5)
        assert got.top_ids.tolist() == p["top_ids"]


@pytest.mark.parametrize("name", ["hellaswag.jsonl", "choices.jsonl"])
def test_windows_are_cut_as_the_harness_cuts_them(name, score_golden):
    tok = from_folder(TINY_A)
    items = tasks.read_task(TASKS / name)
    for item, golden in zip(items, score_golden["tasks"][name], strict=True):
        got = tasks.sequences(item, tok, 128)
        assert [seq for seq, _ in got] == [c["sequence"] for c in golden["choices"]]
        assert [n for _, n in got] == [len(c["logprobs"]) for c in golden["choices"]]


def test_the_long_item_loses_its_left_end(score_golden):
    windows = [c["sequence"] for c in score_golden["tasks"]["choices.jsonl"][3]["choices"]]
    assert [len(w) for w in windows] == [129, 129]  # n_positions + 1: cut


@pytest.mark.parametrize("name", ["hellaswag.jsonl", "choices.jsonl"])
def test_eval_task_json_equals_hand_computed_sums(name, score_golden):
    done = cli("eval", "-m", str(TINY_A), "--task", str(TASKS / name), "--json")
    assert done.exit_code == 0, done.output
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    golden = score_golden["tasks"][name]
    acc, acc_norm = expected(golden)
    assert lines[-1] == {
        "acc": pytest.approx(sum(acc) / len(acc)),
        "acc_norm": pytest.approx(sum(acc_norm) / len(acc_norm)),
        "n": len(golden),
    }
    for line, item, a, an in zip(lines[:-1], golden, acc, acc_norm, strict=True):
        want = [sum(c["logprobs"]) for c in item["choices"]]
        np.testing.assert_allclose(line["logprobs"], want, atol=1e-4)
        assert (line["acc"], line["acc_norm"], line["answer"]) == (a, an, item["answer"])


def test_the_fixtures_tell_acc_from_acc_norm(score_golden):
    """Otherwise a swap of the two would pass."""
    acc, acc_norm = expected(score_golden["tasks"]["hellaswag.jsonl"])
    assert acc != acc_norm


def test_eval_task_prints_one_line():
    done = cli("eval", "-m", str(TINY_A), "--task", str(TASKS / "choices.jsonl"))
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("acc ") and "acc_norm" in done.stdout
    assert done.stdout.count("\n") == 1


def test_ties_go_to_the_first_choice():
    assert tasks._argmax([1.0, 3.0, 3.0]) == 1


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"context": "a", "choices": [" b", " c"]}', "missing 'answer'"),
        ('{"context": "a", "choices": [" b", " c"], "answer": 2}', "'answer' 2 is not in 0..1"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 0}', "missing 'context'"),
        ('{"context": "a", "choices": [" b", ""], "answer": 0}', "choice 1 is empty"),
        ('{"context": "a", "choices": [" b", " c"], "answer": 0', "not a JSON object"),
        (b'{"context": "\xff", "choices": [" b", " c"], "answer": 0}', "not UTF-8"),
    ],
)
def test_a_bad_line_is_named_and_nothing_is_printed(tmp_path, line, says):
    good = '{"context": "x", "choices": [" y", " z"], "answer": 1}\n'
    path = tmp_path / "task.jsonl"
    path.write_bytes(good.encode() + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    done = cli("eval", "-m", str(TINY_A), "--task", str(path), "--json")
    assert done.exit_code == 1
    assert done.stdout == ""
    assert f"{path}:2: {says}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_unknown_form_is_named(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text('{"question": "a", "options": ["b", "c"]}\n')
    with pytest.raises(UserError, match=r"task.jsonl:1: an item needs ctx, endings and label"):
        tasks.read_task(path)


def test_task_and_dataset_conflict():
    done = cli("eval", "--task", str(TASKS / "choices.jsonl"), "--dataset", "x.txt")
    assert done.exit_code == 2
    assert "--task" in done.stderr


def test_a_non_finite_score_is_an_error_not_json(monkeypatch):
    real = tasks.score_items

    def with_a_nan(*args, **kwargs):
        first, *rest = real(*args, **kwargs)
        return [tasks.Result((float("nan"), *first.logprobs[1:]), 0, 0, first.answer), *rest]

    monkeypatch.setattr(tasks, "score_items", with_a_nan)
    done = cli("eval", "-m", str(TINY_A), "--task", str(TASKS / "choices.jsonl"), "--json")
    assert done.exit_code == 1
    assert done.stdout == ""
    assert "log-probability came out not finite" in done.stderr
