"""Speed of `gpt2 eval --task` against `gpt2 eval` on plain text of the same number of tokens.

    uv run python benchmarks/score_task.py                  # GPT-2 124M shape, random weights
    uv run python benchmarks/score_task.py -m gpt2 --items 100

Builds a HellaSwag-shaped task (a context of about 40 words, four endings of about 15), then
times, after one untimed run of each that compiles, the best of `--repeats` runs taken in turns
(the machine's load changes less between neighbours): scoring every choice (`tasks.score_items`, as
`gpt2 eval --task` does, batch 4 windows of the context) and the loss over windows of the whole
context (`evaluate.evaluate`, as `gpt2 eval --dataset` does, batch 4) on as many tokens as
the task's windows hold. Prints both tokens/s and their ratio (the issue asks >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from gpt2cli.config import preset
from gpt2cli.hub import load_model
from gpt2cli.model import init_params
from gpt2cli.scoring import Scorer
from gpt2cli.tokenizer import bundled
from gpt2cli.training import evaluate, tasks

WORDS = [
    "the",
    "a",
    "man",
    "woman",
    "child",
    "dog",
    "river",
    "house",
    "stone",
    "bridge",
    "water",
    "light",
    "old",
    "new",
    "small",
    "large",
    "walks",
    "runs",
    "holds",
    "opens",
    "closes",
    "lifts",
    "pulls",
    "turns",
    "looks",
    "shows",
    "stands",
    "sits",
    "speaks",
    "slowly",
    "quickly",
    "then",
    "while",
    "before",
    "after",
    "into",
    "over",
    "under",
    "with",
    "from",
    "and",
    "but",
]


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def write_task(path: Path, items: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(items):
            item = {
                "ctx": sentence(rng, 40),
                "endings": [sentence(rng, 15) for _ in range(4)],
                "label": rng.randrange(4),
            }
            f.write(json.dumps(item) + "\n")


def best_times(runs: list, repeats: int) -> list[float]:
    """The shortest of `repeats` timings of each run, the runs taken in turns."""
    for run in runs:
        run()  # compiles
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", help="a model reference [default: random GPT-2 124M]")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.model:
        config, params = load_model(args.model)
    else:
        config = preset("gpt2")
        params = init_params(config)
    tok = bundled()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "task.jsonl"
        write_task(path, args.items)
        items = tasks.read_task(path)
    scorer = Scorer(config, params, batch_tokens=args.batch_size * config.n_positions)
    windows = [seq for item in items for seq, _ in tasks.sequences(item, tok, config.n_positions)]
    task_tokens = sum(map(len, windows))
    text = np.asarray([t for seq in windows for t in seq], np.int32)
    task_s, plain_s = best_times(
        [
            lambda: tasks.score_items(scorer, tok, items),
            lambda: evaluate.evaluate(
                config,
                params,
                text,
                length=config.n_positions,
                stride=config.n_positions,
                batch_size=args.batch_size,
            ),
        ],
        args.repeats,
    )
    task_rate, plain_rate = task_tokens / task_s, len(text) / plain_s
    print(f"{len(items)} items, {len(windows)} choices, {task_tokens} tokens in their windows")
    print(f"gpt2 eval --task  {task_rate:10.0f} tokens/s  ({task_s:.2f} s)")
    print(f"gpt2 eval (text)  {plain_rate:10.0f} tokens/s  ({plain_s:.2f} s)")
    print(f"ratio             {task_rate / plain_rate:10.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
