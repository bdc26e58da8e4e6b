"""`gpt2 generate`: continue a prompt, streamed token by token to stdout."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from gpt2cli.cli.options import (
    DEFAULT_MODEL,
    Dtype,
    JsonOutput,
    MaxNewTokens,
    MinP,
    RepetitionPenalty,
    Seed,
    Steer,
    SteerLayer,
    SteerScale,
    Stop,
    Temperature,
    TokenizerRef,
    TopK,
    TopP,
    check_steer_flags,
    steering,
)
from gpt2cli.cli.text import check as check_utf8
from gpt2cli.cli.text import decode
from gpt2cli.errors import UserError

DEFAULT_NEW_TOKENS = 100

ModelOrCheckpoint = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        "--model-name",
        "--checkpoint",
        help="A .npz checkpoint, a Hugging Face folder, or a Hub repo id.",
    ),
]


def _read_prompts(
    prompt: str | None, prompt_option: str | None, prompts_file: Path | None
) -> list[str]:
    given = [
        name
        for name, v in (
            ("PROMPT", prompt),
            ("--prompt", prompt_option),
            ("--prompts-file", prompts_file),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise UserError(f"give the prompt once: {' and '.join(given)} were both given")
    if not given:
        raise UserError("no prompt: pass PROMPT, '-' to read stdin, or --prompts-file FILE")
    if prompts_file is not None:
        try:
            lines = prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise UserError(f"cannot read prompts file {prompts_file}: {reason}") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"prompts file {prompts_file} has no non-empty line")
        return prompts
    text = prompt if prompt is not None else prompt_option
    if text == "-":
        text = decode(sys.stdin.buffer.read(), "stdin")
        text = text[:-1] if text.endswith("\n") else text
    check_utf8(text, "the prompt")
    return [text]


def _new_tokens(max_new_tokens: int | None, max_length: int | None, longest_prompt: int) -> int:
    if max_new_tokens is not None and max_length is not None:
        raise UserError("give --max-new-tokens or --max-length (prompt + new tokens), not both")
    if max_length is None:
        return DEFAULT_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    if max_length <= longest_prompt:
        raise UserError(
            f"--max-length {max_length} leaves no room to generate after a prompt of "
            f"{longest_prompt} tokens; raise it or use --max-new-tokens"
        )
    return max_length - longest_prompt


def _record(prompt: str, sample: int, completion) -> dict:
    return {
        "prompt": prompt,
        "sample": sample,
        "text": completion.text,
        "token_ids": completion.tokens,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "generated_tokens": completion.generated_tokens,
        "timings": {
            "prompt_seconds": round(completion.prompt_seconds, 4),
            "generation_seconds": round(completion.generation_seconds, 4),
        },
    }


def generate(
    prompt: Annotated[
        str | None, typer.Argument(help="Text to continue; '-' reads it from stdin.")
    ] = None,
    model: ModelOrCheckpoint = DEFAULT_MODEL,
    max_new_tokens: MaxNewTokens = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            "--max-length",
            help="Total length, prompt included (kept from the original script's flags).",
        ),
    ] = None,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = 0,
    stop: Stop = None,
    num_samples: Annotated[
        int, typer.Option(help="Samples per prompt, decoded in one batch.", min=1)
    ] = 1,
    prompts_file: Annotated[
        Path | None, typer.Option(help="One prompt per line, all decoded in one batch.")
    ] = None,
    prompt_option: Annotated[
        str | None,
        typer.Option("--prompt", help="The prompt (kept from the original script's flags)."),
    ] = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print at the end.")] = False,
    json_output: JsonOutput = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Stats on stderr.")] = False,
    truncate: Annotated[
        bool, typer.Option(help="Drop the start of a prompt that does not fit the window.")
    ] = False,
    dtype: Dtype = "float32",
    tokenizer: TokenizerRef = None,
    steer: Steer = None,
    steer_layer: SteerLayer = None,
    steer_scale: SteerScale = None,
) -> None:
    """Continue a prompt with a GPT-2 model, streaming the text to stdout.

    Examples:

    \b
      gpt2 generate "Once upon a time"
      gpt2 generate "Once upon a time" -m gpt2.npz --max-new-tokens 200 --temperature 0.8 --top-p 0.95 --seed 1
      echo "The meaning of life is" | gpt2 generate - -m ./hf-folder --num-samples 3 --json
      gpt2 generate "I think dogs are" -m gpt2 --steer love_hate.npy --steer-layer 6 --steer-scale 4
    """
    from gpt2cli.cli.console import err

    check_steer_flags(steer, steer_layer, steer_scale)
    texts = _read_prompts(prompt, prompt_option, prompts_file)

    from gpt2cli import compile_cache
    from gpt2cli.generate import (
        Engine,
        SamplingParams,
        batch_generate,
        check_prompt,
        fit_prompt,
        stream_generate,
    )
    from gpt2cli.hub import load_model, load_tokenizer
    from gpt2cli.progress import hub_progress_class
    from gpt2cli.training import memory

    for text in texts:  # before the model loads
        check_prompt(text)
    sampling = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    compile_cache.enable()
    started = time.perf_counter()
    with err.status(f"loading {model}"):
        config, params = load_model(model, finite=True, tqdm_class=hub_progress_class())
        tok = load_tokenizer(tokenizer, model, tqdm_class=hub_progress_class())
    prompts = [tok.encode(text) for text in texts]
    for text, ids in zip(texts, prompts, strict=True):
        config.check_ids(
            ids, f"the prompt {text[:30]!r}", "; pass the model's tokenizer with --tokenizer"
        )
    new_tokens = _new_tokens(max_new_tokens, max_length, max(map(len, prompts)))
    prompts = [fit_prompt(ids, new_tokens, config.n_positions, truncate) for ids in prompts]
    longest = max(map(len, prompts))
    memory.check_fits(
        memory.generation_footprint(
            config,
            rows=len(prompts) * num_samples,
            length=longest + new_tokens,
            prompt=longest,
            compute_bytes=memory.compute_bytes(dtype),
        ),
        f"{len(prompts)} prompt(s) x {num_samples} sample(s) of {longest + new_tokens} tokens",
        "--num-samples, --max-new-tokens or the number of prompts",
    )
    steers = steering(config, steer, steer_layer, steer_scale)
    engine = Engine(config, params, dtype, batch=len(prompts) * num_samples, steering=steers)
    loaded = time.perf_counter() - started
    stops = stop or []

    if len(prompts) == 1 and num_samples == 1 and not no_stream and not json_output:
        sys.stdout.write(texts[0])
        sys.stdout.flush()
        last = None
        for last in stream_generate(
            engine, tok, prompts[0], max_new_tokens=new_tokens, sampling=sampling, stop=stops
        ):
            sys.stdout.write(last.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        completions = [last]
    else:
        completions = batch_generate(
            engine,
            tok,
            prompts,
            num_samples=num_samples,
            max_new_tokens=new_tokens,
            sampling=sampling,
            stop=stops,
        )
        _print_all(texts, num_samples, completions, json_output)

    if verbose:
        done = completions[-1]
        generated = sum(c.generated_tokens for c in completions)
        rate = (
            (generated - len(completions)) / done.generation_seconds
            if done.generation_seconds
            else 0
        )
        err.print(
            f"load {loaded:.2f} s | prompt {done.prompt_tokens} tokens, first token after "
            f"{done.prompt_seconds:.3f} s | {generated} tokens generated at {rate:.1f} tokens/s "
            f"| finish: {', '.join(sorted({c.finish_reason for c in completions}))}"
        )


def _print_all(texts: list[str], num_samples: int, completions: list, json_output: bool) -> None:
    many = len(completions) > 1
    for index, completion in enumerate(completions):
        prompt_index, sample = divmod(index, num_samples)
        if json_output:
            record = _record(texts[prompt_index], sample, completion)
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            if many:
                sys.stdout.write(f"=== prompt {prompt_index + 1}, sample {sample + 1} ===\n")
            sys.stdout.write(texts[prompt_index] + completion.text + "\n")
        sys.stdout.flush()
