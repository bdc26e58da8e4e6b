"""Shared bits of the training tests: a learnable toy corpus and the fixture paths."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
TINY_A = FIXTURES / "tiny-a"

_WORDS = [
    "the",
    "cat",
    "dog",
    "bird",
    "sat",
    "ran",
    "flew",
    "on",
    "under",
    "over",
    "a",
    "red",
    "big",
    "small",
    "mat",
    "log",
    "tree",
]


def write_corpus(path: Path, lines: int = 300, seed: int = 0) -> Path:
    """Short sentences over a 17-word vocabulary: easy to learn, so losses fall fast."""
    rng = random.Random(seed)
    text = "\n".join(
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 10))) + "." for _ in range(lines)
    )
    path.write_text(text + "\n", encoding="utf-8")
    return path


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


class Recorder:
    """Loop hooks that keep the logged losses and save nothing."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, record: dict) -> None:
        self.losses.append(record["loss"])

    def on_save(self, state, step: int) -> None:
        pass

    def measure(self, params, step: int, evaluating: bool) -> dict:
        return {}

    def compiling(self, what: str):
        return contextlib.nullcontext()


def isolate(tmp_path, monkeypatch) -> None:
    """A test's own token cache and working folder; no compiled programs in ~/.cache."""
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GPT2_NO_COMPILE_CACHE", "1")
    monkeypatch.chdir(tmp_path)


def assert_opens_in_transformers(folder, context: int) -> None:
    """transformers (no torch) reads the folder's tokenizer as GPT-2's, with its ids."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("hello world").input_ids == [31373, 995]
    assert tokenizer(" Hello, world!<|endoftext|>").input_ids == [18435, 11, 995, 0, 50256]
    assert tokenizer.eos_token_id == 50256 and tokenizer.model_max_length == context
    assert tokenizer.decode([31373, 995]) == "hello world"
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id == 50256 and generation.bos_token_id == 50256
    assert len(json.loads((folder / "vocab.json").read_text())) == 50257
