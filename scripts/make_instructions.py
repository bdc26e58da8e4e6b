"""A small synthetic instruction set, and a score of a model on its held-out prompts.

    uv run python scripts/make_instructions.py make data/instr          # train.jsonl, heldout.jsonl
    uv run python scripts/make_instructions.py score data/instr/heldout.jsonl -m shakespeare
    uv run python scripts/make_instructions.py run data/instr runs/instr -- --mask-prompt --steps 400

Three kinds of question, each answered with one word that depends on the prompt:
- echo: "Repeat the word: river" -> "river", in four frames ("Say the word river.", ...);
- order: "Which comes first in the alphabet, lemon or apple?" -> "apple";
- world: questions about a fixed small world ("What pet does Anna have?" -> "cat"), three
  phrasings per attribute (pet, colour, drink).
No held-out prompt is a training prompt, but each is made of what training teaches: a held-out
echo word is echoed in training in the other frames (and its frame holds other words); a
held-out world fact is asked in training in the other phrasings (and its phrasing asks about
other people); a held-out alphabet pair is new, of words seen in other pairs.

`score` pipes the held-out prompts through `gpt2 chat` (with /reset between them, so each is a
conversation of its own, as in training) and counts the replies that are exactly the answer.
`run` trains `gpt2 train` on train.jsonl (extra flags after --) and scores the result (with
--lora: the base model with the run's adapter). Rows are prompt/completion pairs; the seed is
fixed, so the files are the same on every run.
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
FACTS = {
    "pet": ("cat", "dog", "bird", "fish"),
    "colour": ("red", "blue", "green", "black"),
    "drink": ("tea", "milk", "juice", "coffee"),
}
ECHO = (  # frames of the echo question
    "Repeat the word: {w}",
    "Say the word {w}.",
    "Echo this word: {w}",
    "Please say {w}.",
)
WORLD = {  # phrasings of the world questions, per attribute
    "pet": ("What pet does {p} have?", "Which animal lives with {p}?", "Tell me the pet of {p}."),
    "colour": (
        "What is {p}'s favourite colour?",
        "Which colour does {p} like best?",
        "Name the colour {p} loves.",
    ),
    "drink": ("What does {p} drink?", "Which drink does {p} like?", "Tell me the drink of {p}."),
}
SEED = 20


def split(items: list, held: int, rng: random.Random) -> tuple[list, list]:
    """The items shuffled and cut in two: (held out, for training)."""
    items = list(items)
    rng.shuffle(items)
    return items[:held], items[held:]


def questions(rng: random.Random) -> dict[str, tuple[list, list]]:
    """Per kind, the (prompt, answer) pairs held out and those to train on. A held-out prompt is
    never a training one, but is made of what training shows: its echo word is echoed in other
    frames and its frame holds other words; its world fact is asked in the other phrasings and
    its phrasing asks about other people; its alphabet pair is new, of words seen in other pairs.
    """
    facts = {p: {a: rng.choice(v) for a, v in FACTS.items()} for p in PEOPLE}
    # one frame held out per word, each frame held out for a quarter of the words
    echo_held, echo_train = [], []
    for i, word in enumerate(WORDS):
        for j, frame in enumerate(ECHO):
            pair = (frame.format(w=word), word)
            (echo_held if j == i % len(ECHO) else echo_train).append(pair)
    world_held, world_train = [], []
    for i, person in enumerate(PEOPLE):
        for attribute, phrasings in WORLD.items():
            for j, text in enumerate(phrasings):
                pair = (text.format(p=person), facts[person][attribute])
                (world_held if j == i % len(phrasings) else world_train).append(pair)
    ask = lambda a, b: (f"Which comes first in the alphabet, {a} or {b}?", min(a, b))  # noqa: E731
    pairs = [(a, b) for i, a in enumerate(ORDER_WORDS) for b in ORDER_WORDS[i + 1 :]]
    held_pairs, train_pairs = split(pairs, 60, rng)  # a held-out pair is in neither order
    order_held = [ask(*rng.sample(pair, 2)) for pair in held_pairs]
    order_train = [ask(a, b) for a, b in train_pairs] + [ask(b, a) for a, b in train_pairs]
    return {
        "echo": (echo_held, echo_train),
        "order": (order_held, order_train),
        "world": (world_held, world_train),
    }


def make(out: Path, train_rows: int = 3000, held_rows: int = 100) -> None:
    rng = random.Random(SEED)
    kinds = questions(rng)
    held = {kind: rng.sample(h, len(h)) for kind, (h, _) in kinds.items()}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for i in range(train_rows):
            kind = list(kinds)[i % len(kinds)]
            prompt, answer = rng.choice(kinds[kind][1])
            f.write(json.dumps({"prompt": prompt, "completion": answer, "kind": kind}) + "\n")
    with open(out / "heldout.jsonl", "w") as f:
        for i in range(held_rows):  # each held-out prompt once
            kind = list(kinds)[i % len(kinds)]
            prompt, answer = held[kind][i // len(kinds)]
            f.write(json.dumps({"prompt": prompt, "completion": answer, "kind": kind}) + "\n")
    print(f"wrote {train_rows} + {held_rows} rows to {out}", file=sys.stderr)


def score(heldout: Path, model: str, template: str = "chat", adapter: Path | None = None) -> str:
    """The share of held-out prompts whose greedy `gpt2 chat` reply is exactly the answer, in
    all and per kind of question, as one line."""
    rows = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
    stdin = "".join(f"{row['prompt']}\n/reset\n" for row in rows)
    command = ["gpt2", "chat", "-m", model, "--template", template, "--json"]
    command += ["--max-new-tokens", "8", "--temperature", "0"]
    if adapter is not None:
        command += ["--adapter", str(adapter)]
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=True)
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    replies = [r for r in replies if "reply" in r]
    if len(replies) != len(rows):
        raise SystemExit(f"got {len(replies)} replies for {len(rows)} prompts: {done.stderr}")
    kinds: dict[str, list[bool]] = {}
    for reply, row in zip(replies, rows, strict=True):
        kinds.setdefault(row["kind"], []).append(_clean(reply["reply"]) == row["completion"])
    shares = ", ".join(f"{kind} {sum(v) / len(v):.0%}" for kind, v in kinds.items())
    right = sum(sum(v) for v in kinds.values())
    return f"{right / len(rows):.0%} of held-out prompts answered exactly ({shares})"


def _clean(reply: str) -> str:
    return reply.strip().rstrip(".!").strip()


def run(data: Path, out: Path, flags: list[str], template: str, model: str = "shakespeare") -> None:
    """Fine-tune on train.jsonl and score the result: its final.npz, or with --lora the base
    model with the run's adapter."""
    command = ["gpt2", "train", "--dataset", str(data / "train.jsonl"), "-m", model]
    command += ["--out", str(out), "--chat-template", template, *flags]
    print(" ".join(command), file=sys.stderr)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    minutes = (time.perf_counter() - started) / 60
    if "--lora" in flags:
        tuned = score(data / "heldout.jsonl", model, template, adapter=out / "adapter")
    else:
        tuned = score(data / "heldout.jsonl", str(out / "final.npz"), template)
    print(f"fine-tuned ({' '.join(flags)}; {minutes:.1f} min of training): {tuned}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("make", help="write train.jsonl and heldout.jsonl into a folder")
    p.add_argument("out", type=Path)
    p = sub.add_parser("score", help="score a model on the held-out rows")
    p.add_argument("heldout", type=Path)
    p.add_argument("-m", "--model", default="shakespeare")
    p.add_argument("--template", default="chat", help="the chat template (gpt2 chat --template)")
    p.add_argument("--adapter", type=Path, help="a LoRA adapter folder (gpt2 chat --adapter)")
    p = sub.add_parser("run", help="fine-tune the model and score the result")
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--template", default="chat", help="the chat template, in training and chat")
    p.add_argument("flags", nargs="*", help="gpt2 train flags (after --)")
    args = parser.parse_args()
    if args.action == "make":
        make(args.out)
    elif args.action == "score":
        print(f"{args.model}: {score(args.heldout, args.model, args.template, args.adapter)}")
    else:
        run(args.data, args.out, args.flags, args.template)


if __name__ == "__main__":
    main()
