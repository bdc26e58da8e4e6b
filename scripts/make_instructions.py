"""A small synthetic instruction set, and a score of a model on its held-out prompts.

    uv run python scripts/make_instructions.py make data/instr          # train.jsonl, heldout.jsonl
    uv run python scripts/make_instructions.py score data/instr/heldout.jsonl -m shakespeare
    uv run python scripts/make_instructions.py run data/instr runs/instr -- --mask-prompt --steps 300

Three kinds of question, each answered with one word that depends on the prompt:
- echo: "Repeat the word: river" -> "river" (a word from a list; held-out words are unseen);
- order: "Which comes first in the alphabet, lemon or apple?" -> "apple";
- world: questions about a fixed small world ("What pet does Anna have?" -> "cat"), asked in
  phrasings of which the held-out rows use one that training never does.

`score` pipes the held-out prompts through `gpt2 chat` (with /reset between them, so each is a
conversation of its own, as in training) and counts the replies that are exactly the answer.
`run` trains `gpt2 train` on train.jsonl (extra flags after --) and scores the result, base
model first. Rows are prompt/completion pairs; the seed is fixed, so the files are the same on
every run.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

# fmt: off
ORDER_WORDS = (  # one per first letter: the order is the letters' order
    "apple", "bread", "chair", "dance", "eagle", "flame", "grape", "house", "island", "jelly",
    "kettle", "lemon", "money", "north", "ocean", "paper", "queen", "river", "stone", "table",
    "uncle", "voice", "water", "yellow", "zebra",
)
WORDS = ORDER_WORDS + (  # the words to echo
    "garden", "market", "window", "summer", "winter", "forest", "castle", "silver", "candle",
    "pillow", "rabbit", "spider", "tiger", "violet", "wonder", "mirror", "button", "cotton",
    "dragon", "engine", "finger", "hammer", "jacket", "ladder", "monkey", "needle", "orange",
    "pepper", "rocket", "saddle", "tunnel", "velvet", "wagon", "basket", "copper", "doctor",
    "farmer", "guitar", "helmet", "iron", "jungle", "kitten",
)
PEOPLE = (
    "Anna", "Ben", "Carl", "Dora", "Emma", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kate",
    "Liam",
)
# fmt: on
PETS = ("cat", "dog", "bird", "fish")
COLOURS = ("red", "blue", "green", "black")
WORLD_TRAIN = (
    ("What pet does {p} have?", "pet"),
    ("Which animal lives with {p}?", "pet"),
    ("What is {p}'s favourite colour?", "colour"),
    ("Which colour does {p} like best?", "colour"),
)
WORLD_HELD = (("Tell me the pet of {p}.", "pet"), ("Name the colour {p} loves.", "colour"))
SEED = 20


def world(rng: random.Random) -> dict[str, dict[str, str]]:
    return {p: {"pet": rng.choice(PETS), "colour": rng.choice(COLOURS)} for p in PEOPLE}


def echo(rng: random.Random, words: list[str]) -> tuple[str, str]:
    word = rng.choice(words)
    return f"Repeat the word: {word}", word


def order(rng: random.Random, pairs: list[tuple[str, str]]) -> tuple[str, str]:
    a, b = rng.choice(pairs)
    return f"Which comes first in the alphabet, {a} or {b}?", min(a, b)


def ask(rng: random.Random, facts, phrasings) -> tuple[str, str]:
    person = rng.choice(PEOPLE)
    text, attribute = rng.choice(phrasings)
    return text.format(p=person), facts[person][attribute]


def make(out: Path, train_rows: int = 3000, held_rows: int = 100) -> None:
    rng = random.Random(SEED)
    facts = world(rng)
    words = list(WORDS)
    rng.shuffle(words)
    held_words, train_words = words[:10], words[10:]
    pairs = [(a, b) for a in ORDER_WORDS for b in ORDER_WORDS if a != b]
    rng.shuffle(pairs)
    held_pairs, train_pairs = pairs[:60], pairs[60:]
    makers_train = {
        "echo": lambda: echo(rng, train_words),
        "order": lambda: order(rng, train_pairs),
        "world": lambda: ask(rng, facts, WORLD_TRAIN),
    }
    makers_held = {
        "echo": lambda: echo(rng, held_words),
        "order": lambda: order(rng, held_pairs),
        "world": lambda: ask(rng, facts, WORLD_HELD),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, count, makers in (
        ("train.jsonl", train_rows, makers_train),
        ("heldout.jsonl", held_rows, makers_held),
    ):
        with open(out / name, "w") as f:
            for i in range(count):
                kind = list(makers)[i % len(makers)]
                prompt, answer = makers[kind]()
                row = {"prompt": prompt, "completion": answer, "kind": kind}
                f.write(json.dumps(row) + "\n")
    print(f"wrote {train_rows} + {held_rows} rows to {out}", file=sys.stderr)


def score(heldout: Path, model: str, template: str = "chat") -> float:
    """Share of held-out prompts whose greedy `gpt2 chat` reply is exactly the answer (and, on
    stderr, that share per kind of question)."""
    rows = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
    stdin = "".join(f"{row['prompt']}\n/reset\n" for row in rows)
    command = ["gpt2", "chat", "-m", model, "--template", template, "--json"]
    command += ["--max-new-tokens", "8"]
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=True)
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    replies = [r for r in replies if "reply" in r]
    if len(replies) != len(rows):
        raise SystemExit(f"got {len(replies)} replies for {len(rows)} prompts: {done.stderr}")
    kinds: dict[str, list[bool]] = {}
    for reply, row in zip(replies, rows, strict=True):
        kinds.setdefault(row["kind"], []).append(_clean(reply["reply"]) == row["completion"])
    shares = ", ".join(f"{kind} {sum(v) / len(v):.0%}" for kind, v in kinds.items())
    print(f"{model}: {shares}", file=sys.stderr)
    return sum(sum(v) for v in kinds.values()) / len(rows)


def _clean(reply: str) -> str:
    return reply.strip().rstrip(".!").strip()


def run(data: Path, out: Path, flags: list[str], template: str, model: str = "shakespeare") -> None:
    base = score(data / "heldout.jsonl", model, template)
    print(f"base {model}: {base:.0%} of held-out prompts answered exactly")
    command = ["gpt2", "train", "--dataset", str(data / "train.jsonl"), "-m", model]
    command += ["--out", str(out), "--chat-template", template, *flags]
    print(" ".join(command), file=sys.stderr)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    minutes = (time.perf_counter() - started) / 60
    tuned = score(data / "heldout.jsonl", str(out / "final.npz"), template)
    print(f"fine-tuned ({' '.join(flags)}; {minutes:.1f} min): {tuned:.0%} answered exactly")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("make", help="write train.jsonl and heldout.jsonl into a folder")
    p.add_argument("out", type=Path)
    p = sub.add_parser("score", help="score a model on the held-out rows")
    p.add_argument("heldout", type=Path)
    p.add_argument("-m", "--model", default="shakespeare")
    p.add_argument("--template", default="chat", help="the chat template (gpt2 chat --template)")
    p = sub.add_parser("run", help="score the base model, fine-tune it, score the result")
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--template", default="chat", help="the chat template, in training and chat")
    p.add_argument("flags", nargs="*", help="gpt2 train flags (after --)")
    args = parser.parse_args()
    if args.action == "make":
        make(args.out)
    elif args.action == "score":
        share = score(args.heldout, args.model, args.template)
        print(f"{share:.0%} of held-out prompts answered exactly")
    else:
        run(args.data, args.out, args.flags, args.template)


if __name__ == "__main__":
    main()
