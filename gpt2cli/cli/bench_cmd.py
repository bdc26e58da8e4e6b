"""`gpt2 bench`: prefill and decode speed, first-token latency, compile time and peak memory."""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Annotated

import typer

from gpt2cli.cli.options import DEFAULT_MODEL, Dtype, JsonOutput, ModelRef, Temperature, TopK, TopP


def measure(
    engine,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    sampling=None,
    stream: bool = True,
) -> dict:
    """Runs on random prompts (EOS ignored, greedy unless `sampling` says otherwise): the first
    compiles, the best of the rest is reported. `stream=False`: runs as `generate` does them
    (one decode call on a GPU)."""
    import numpy as np

    from gpt2cli.generate import SamplingParams, TokenRun

    rng = np.random.default_rng(0)
    prompts = rng.integers(0, engine.config.vocab_size, (batch, prompt_tokens)).tolist()
    sampling = sampling or SamplingParams()

    def run() -> tuple[float, float]:
        tokens = TokenRun(
            engine, prompts, max_new_tokens=new_tokens, sampling_params=sampling, stream=stream
        )
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in tokens]
        return stamps[0] - start, stamps[-1] - stamps[0]

    cold_first, cold_decode = run()
    runs = [run() for _ in range(repeats)]
    first = min(r[0] for r in runs)
    decode = min(r[1] for r in runs)
    steps = new_tokens - 1
    return {
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": batch * prompt_tokens / first,
        "decode_tokens_per_s": batch * steps / decode if steps else None,
        "first_token_s": first,
        "compile_s": max(cold_first - first, 0.0) + max(cold_decode - decode, 0.0),
        "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def bench(
    model: ModelRef = DEFAULT_MODEL,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length in tokens.", min=1)] = 32,
    new_tokens: Annotated[int, typer.Option(help="Tokens to generate per row.", min=1)] = 128,
    batch: Annotated[int, typer.Option(help="Rows decoded together.", min=1)] = 1,
    repeats: Annotated[
        int, typer.Option(help="Timed runs after the first (best is kept).", min=1)
    ] = 3,
    dtype: Dtype = "float32",
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    json_output: JsonOutput = False,
) -> None:
    """Measure generation speed: prefill and decode tokens/s, first-token latency, compile time.

    The first run compiles (and fills the persistent compilation cache); the best of the timed
    runs after it is reported. Random prompts, EOS ignored, greedy unless --temperature is set.

    Examples:

    \b
      gpt2 bench -m gpt2.npz --prompt-tokens 32 --new-tokens 128 --batch 1
      gpt2 bench -m ./hf-folder --dtype bfloat16 --batch 8 --json
      gpt2 bench -m gpt2.npz --temperature 0.8 --top-p 0.95
    """

    from gpt2cli import compile_cache
    from gpt2cli.cli.console import err
    from gpt2cli.generate import Engine, SamplingParams
    from gpt2cli.hub import load_model
    from gpt2cli.progress import hub_progress_class
    from gpt2cli.training import memory

    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)  # checks ranges
    compile_cache.enable()
    with err.status(f"loading {model}"):
        config, params = load_model(model, finite=True, tqdm_class=hub_progress_class())
    config.check_fits(prompt_tokens + new_tokens, "--prompt-tokens + --new-tokens =")
    memory.check_fits(
        memory.generation_footprint(
            config,
            rows=batch,
            length=prompt_tokens + new_tokens,
            prompt=prompt_tokens,
            compute_bytes=memory.compute_bytes(dtype),
        ),
        f"--batch {batch} x {prompt_tokens + new_tokens} tokens",
        "--batch, --prompt-tokens or --new-tokens",
    )
    engine = Engine(config, params, dtype, batch=batch)
    with err.status("measuring"):
        result = {
            "model": model,
            "dtype": dtype,
            "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p},
            **measure(engine, batch, prompt_tokens, new_tokens, repeats, sampling),
        }
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    decode = result["decode_tokens_per_s"]
    rows = [
        ("model", model),
        ("dtype / batch", f"{dtype} / {batch}"),
        ("prompt / new tokens", f"{prompt_tokens} / {new_tokens}"),
        ("sampling", sampling_text(sampling)),
        ("prefill tokens/s", f"{result['prefill_tokens_per_s']:.1f}"),
        ("decode tokens/s", f"{decode:.1f}" if decode else "-"),
        ("first token latency", f"{result['first_token_s'] * 1000:.1f} ms"),
        ("compile (first run extra)", f"{result['compile_s']:.2f} s"),
        ("peak memory (RSS)", f"{result['peak_memory_mib']:.0f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        sys.stdout.write(f"{name:<{width}}  {value}\n")


def sampling_text(sampling) -> str:
    if sampling.temperature == 0.0:
        return "greedy"
    parts = [f"temperature {sampling.temperature:g}"]
    parts += [f"top-k {sampling.top_k}"] if sampling.top_k else []
    parts += [f"top-p {sampling.top_p:g}"] if sampling.top_p < 1.0 else []
    return ", ".join(parts)
