"""First-token latency of chat turns 1, 10 and 30, with the prompt cache and without it.

    uv run python benchmarks/chat_latency.py ../bench/gpt2-124m-random

A scripted conversation (greedy, a fixed number of reply tokens) runs on a GPT-2 124M-shaped
model. With the prompt cache a turn prefills only its own tokens, so its latency should not
grow with the history: target, turn 30 within 1.5x of turn 1. The peer, measured in the same
run just before each shown turn, is that turn's transcript prefilled from scratch with no cache
(what a chat without a prompt cache pays), which grows with the history. A warm-up conversation
compiles every shape first; each figure is the median over the repeats.
"""

from __future__ import annotations

import argparse
import statistics

TURNS_SHOWN = (1, 10, 30)


def full_prefill_seconds(engine, tokenizer, prompt_ids) -> float:
    """First-token seconds of `prompt_ids` with no cache: what a turn costs without one."""
    from gpt2cli.generate import generate

    return generate(engine, tokenizer, prompt_ids, max_new_tokens=1).prompt_seconds


def conversation(engine, tokenizer, *, turns: int, max_new_tokens: int):
    """First-token seconds of every turn with the cache, and of the shown turns without it."""
    from gpt2cli.chat import ChatSession

    session = ChatSession(engine, tokenizer, max_new_tokens=max_new_tokens)
    cached, uncached = [], {}
    for turn in range(1, turns + 1):
        message = f"Tell me something interesting about topic number {turn}."
        if turn in TURNS_SHOWN:
            prompt = session.tokenizer.encode(session.template.turn_prompt(message))
            uncached[turn] = full_prefill_seconds(
                engine, tokenizer, session.transcript_ids() + prompt
            )
        for _ in session.send(message):
            pass
        assert session.last.dropped_turns == 0, "the window filled: use fewer or shorter turns"
        cached.append(session.last.first_token_s)
    return cached, uncached, session.context_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a GPT-2 HF folder or .npz (124M-shaped random weights)")
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from gpt2cli.generate import Engine
    from gpt2cli.hub import load_model, load_tokenizer

    config, params = load_model(args.model)
    engine = Engine(config, params, dtype=args.dtype)
    tokenizer = load_tokenizer(None, args.model)
    run = dict(turns=args.turns, max_new_tokens=args.max_new_tokens)

    conversation(engine, tokenizer, **run)  # compile every shape
    runs = [conversation(engine, tokenizer, **run) for _ in range(args.repeats)]
    shown = [t for t in TURNS_SHOWN if t <= args.turns]
    cached = {t: statistics.median(r[0][t - 1] for r in runs) for t in shown}
    uncached = {t: statistics.median(r[1][t] for r in runs) for t in shown}

    print(
        f"model {args.model} ({config.num_params() / 1e6:.0f}M params, {args.dtype}), "
        f"{args.turns} turns of {args.max_new_tokens} reply tokens "
        f"({runs[0][2]} tokens in context at the end), median of {args.repeats}"
    )
    print(f"{'first-token ms':<26}" + "".join(f"{'turn ' + str(t):>10}" for t in shown))
    for label, row in (("with the prompt cache", cached), ("full re-prefill (peer)", uncached)):
        print(f"{label:<26}" + "".join(f"{row[t] * 1000:>10.1f}" for t in shown))
    last = shown[-1]
    print(f"turn {last} / turn 1 with the cache: {cached[last] / cached[1]:.2f}x (target <= 1.5x)")
    print(f"turn {last}: full re-prefill / cached: {uncached[last] / cached[last]:.1f}x")


if __name__ == "__main__":
    main()
