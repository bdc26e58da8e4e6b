"""What reading every activation costs: run_with_cache of all hook points against the plain
forward (gpt2cli.logits), GPT-2 124M, one prompt of 128 tokens.

    uv run python benchmarks/lens_cost.py [MODEL] [--tokens 128] [--runs 20] [--dtype float32]

MODEL defaults to ../bench/gpt2-124m-random (scripts/make_fixtures.py --bench-dir writes it).
Target: run_with_cache of every name at most 2x the plain forward. Both are timed after their
first (compiling) call, as the median of --runs calls, waiting for every output array.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import gpt2cli


def median_seconds(fn, runs: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="../bench/gpt2-124m-random")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    config, params = gpt2cli.load(args.model)
    params = jax.device_put(params)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.tokens))

    def plain():
        return gpt2cli.logits(config, params, ids, dtype=args.dtype)

    def cached():
        return gpt2cli.run_with_cache(config, params, ids, dtype=args.dtype)

    plain_s = median_seconds(plain, args.runs)
    cached_s = median_seconds(cached, args.runs)
    _, cache = cached()
    mib = sum(a.nbytes for a in cache.values()) / 2**20
    print(f"device              : {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"model               : {args.model}, {config.n_layer} layers, {args.dtype}")
    print(
        f"plain forward       : {plain_s * 1e3:8.2f} ms (median of {args.runs}), {args.tokens} tokens"
    )
    print(f"run_with_cache, all : {cached_s * 1e3:8.2f} ms, {len(cache)} names, {mib:.1f} MiB kept")
    print(f"ratio               : {cached_s / plain_s:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
