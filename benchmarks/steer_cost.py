"""What steering costs while decoding: tokens/s of plain and steered greedy decoding.

    uv run python benchmarks/steer_cost.py ../bench/gpt2-124m-random

Batch 1, a 32-token prompt, 128 new tokens, float32, on a GPT-2 124M-shaped model; the steered
engine adds a random vector x 4 at block 6's input (`--steer ... --steer-layer 6 --steer-scale
4`). Runs alternate plain, steered, plain, ... after one of each compiles; tokens/s counts the
tokens after the first over the time from the first to the last (decoding, not the prefill),
as `gpt2 generate --verbose` does. Target: steered within 10% of plain (ratio >= 0.9).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def decode_rate(engine, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s of one streamed greedy run (every token is read back as it comes)."""
    from gpt2cli.engine import SamplingParams
    from gpt2cli.generate import TokenRun

    run = TokenRun(engine, [prompt], max_new_tokens=new_tokens, sampling_params=SamplingParams())
    first = None
    for _ in run:
        first = first or time.perf_counter()
    return (new_tokens - 1) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a GPT-2 HF folder or .npz (124M-shaped random weights)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    import jax

    from gpt2cli.engine import Engine, Steering
    from gpt2cli.hub import load_model

    config, params = load_model(args.model)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, args.prompt_tokens).tolist()
    vector = rng.normal(size=config.n_embd).astype(np.float32)
    engines = {
        "plain": Engine(config, params, args.dtype),
        "steered": Engine(
            config, params, args.dtype, steering=Steering(args.layer, vector, args.scale)
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():  # compile
        decode_rate(engine, prompt, args.new_tokens)
    for _ in range(args.repeats):
        for name, engine in engines.items():
            rates[name].append(decode_rate(engine, prompt, args.new_tokens))

    print(
        f"model {args.model} ({config.num_params() / 1e6:.0f}M params, {args.dtype}) on "
        f"{jax.devices()[0].device_kind}: batch 1, {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens, steered at layer {args.layer} x {args.scale}; "
        f"median of {args.repeats} alternating runs"
    )
    for name, runs in rates.items():
        print(
            f"{name:<8} {statistics.median(runs):8.1f} tokens/s   runs: "
            + " ".join(f"{r:.1f}" for r in runs)
        )
    pairs = [s / p for p, s in zip(rates["plain"], rates["steered"], strict=True)]
    ratio = statistics.median(rates["steered"]) / statistics.median(rates["plain"])
    print(
        f"steered / plain: {ratio:.3f} (median of pairs {statistics.median(pairs):.3f}; "
        "target >= 0.90)"
    )


if __name__ == "__main__":
    main()
