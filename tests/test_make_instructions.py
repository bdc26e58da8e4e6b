"""scripts/make_instructions.py's held-out split: every held-out prompt is new, yet made only of
what the training rows teach (the acceptance experiment of fine-tuning on instructions)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "make_instructions.py"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_instructions", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path_factory.mktemp("instr")
    script.make(out)
    read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]  # noqa: E731
    return script, read("train.jsonl"), read("heldout.jsonl")


def test_sizes_and_kinds(rows):
    _, train, held = rows
    assert len(train) == 3000 and len(held) == 100
    assert {r["kind"] for r in held} == {"echo", "order", "world"}
    assert len({r["prompt"] for r in held}) == 100  # each held-out prompt once


def test_no_held_out_prompt_is_a_training_prompt(rows):
    _, train, held = rows
    seen = {r["prompt"] for r in train}
    assert not [r["prompt"] for r in held if r["prompt"] in seen]


def test_echo_words_and_frames_are_taught(rows):
    script, train, held = rows
    frames = [re.escape(f).replace(r"\{w\}", "(.+)") for f in script.ECHO]
    frame_of = lambda prompt: next(i for i, f in enumerate(frames) if re.fullmatch(f, prompt))  # noqa: E731
    taught = {(frame_of(r["prompt"]), r["completion"]) for r in train if r["kind"] == "echo"}
    for r in (r for r in held if r["kind"] == "echo"):
        frame = frame_of(r["prompt"])
        assert any(w == r["completion"] for f, w in taught if f != frame), r  # word, other frame
        assert any(f == frame for f, w in taught if w != r["completion"]), r  # frame, other word


def test_world_facts_and_phrasings_are_taught(rows):
    script, train, held = rows
    phrasings = [t for texts in script.WORLD.values() for t in texts]
    parse = {t.format(p=p): (t, p) for t in phrasings for p in script.PEOPLE}
    facts = {}
    for r in (r for r in train if r["kind"] == "world"):
        text, person = parse[r["prompt"]]
        facts.setdefault((person, _attribute(script, text)), set()).add((text, r["completion"]))
    for r in (r for r in held if r["kind"] == "world"):
        text, person = parse[r["prompt"]]
        told = facts[(person, _attribute(script, text))]
        assert {answer for _, answer in told} == {r["completion"]}, r  # the same fact, taught
        assert any(parse[t["prompt"]][0] == text for t in train if t["kind"] == "world"), r


def test_order_pairs_are_new_but_their_words_are_not(rows):
    _, train, held = rows
    pair = lambda prompt: frozenset(re.findall(r"(\w+) or (\w+)\?", prompt)[0])  # noqa: E731
    taught = {pair(r["prompt"]) for r in train if r["kind"] == "order"}
    words = set().union(*taught)
    for r in (r for r in held if r["kind"] == "order"):
        assert pair(r["prompt"]) not in taught and pair(r["prompt"]) <= words, r
        assert r["completion"] == min(pair(r["prompt"]))


def _attribute(script, text):
    return next(a for a, texts in script.WORLD.items() if text in texts)
