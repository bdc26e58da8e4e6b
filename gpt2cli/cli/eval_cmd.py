"""`gpt2 eval`: loss and perplexity of a model on text files, or its accuracy on a
multiple-choice task."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from gpt2cli.cli.options import (
    DEFAULT_MODEL,
    AdapterDir,
    Dataset,
    Dtype,
    JsonOutput,
    ModelRef,
    MoreFiles,
    TextErrors,
    TokenizerRef,
    flags_for,
)
from gpt2cli.errors import UserError

Opt = typer.Option


def evaluate(
    dataset: Dataset = None,
    more_files: MoreFiles = None,
    model: ModelRef = DEFAULT_MODEL,
    tokenizer: TokenizerRef = None,
    seq_length: Annotated[
        int | None,
        Opt("--seq-length", min=1, help="Window length [default: the model's context]."),
    ] = None,
    stride: Annotated[
        int | None,
        Opt(
            "--stride",
            min=1,
            help="Window step; less than --seq-length scores each token with more "
            "context (HF perplexity guide) [default: --seq-length, no overlap].",
        ),
    ] = None,
    batch_size: Annotated[
        int, Opt("--batch-size", "-b", min=1, help="Windows per forward pass.")
    ] = 4,
    dtype: Dtype = "float32",
    adapter: AdapterDir = None,
    errors: TextErrors = None,
    as_json: JsonOutput = False,
    mask_prompt: Annotated[
        bool,
        Opt(
            "--mask-prompt",
            help="Instruction or chat rows: score only the replies (as gpt2 train --mask-prompt).",
        ),
    ] = False,
    chat_template: Annotated[
        str, Opt("--chat-template", help="The template chat rows are written in.")
    ] = "chat",
    task: Annotated[
        str | None,
        Opt(
            "--task",
            help="A multiple-choice task (jsonl: HellaSwag's ctx/endings/label, or "
            "context/choices/answer): print acc and acc_norm instead of the loss.",
        ),
    ] = None,
) -> None:
    """Loss and perplexity of a model on text files, or accuracy on a multiple-choice task.

    Examples:

    \b
      gpt2 eval -m runs/ft/final.npz --dataset val.txt
      gpt2 eval -m gpt2 --dataset wiki.txt --seq-length 1024 --stride 512 --json
      gpt2 eval -m runs/scratch/final.npz --dataset data/corpus
      gpt2 eval -m runs/sft/final.npz --dataset chats.jsonl --mask-prompt
      gpt2 eval -m gpt2 --task hellaswag_val.jsonl
      gpt2 eval -m gpt2 --dataset val.txt --adapter runs/lora/adapter
    """
    import os

    if task is not None:
        if dataset or more_files or seq_length or stride:
            raise typer.BadParameter(
                "--task scores its own windows: drop --dataset, --seq-length and --stride",
                param_hint="--task",
            )
        _score_task(task, model, tokenizer, batch_size, dtype, as_json, adapter)
        return
    if not (dataset or more_files):
        raise UserError("give the text to score with --dataset FILE")
    errors = errors or "strict"

    import numpy as np

    from gpt2cli import compile_cache
    from gpt2cli.hub import load_model, load_tokenizer
    from gpt2cli.progress import hub_progress_class, task_progress
    from gpt2cli.training import data, examples
    from gpt2cli.training import evaluate as evaluation

    compile_cache.enable()
    names = list(dataset or []) + list(more_files or [])
    prepared_rows = len(names) == 1 and examples.is_prepared_examples(names[0])
    prepared = None if prepared_rows else _prepared(names)
    if prepared_rows:
        files = [Path(names[0])]
    else:
        files = [] if prepared else data.resolve_files(names, os.environ.get("DATA_DIR"))
    with flags_for({"mask_prompt"}):
        rows = prepared_rows or (not prepared and examples.is_examples(files, mask_prompt))
    config, params = load_model(
        model, finite=True, tqdm_class=hub_progress_class(), adapter=adapter
    )
    if rows:
        _score_examples(files, config, params, model, tokenizer, seq_length, batch_size, dtype,
                        mask_prompt, chat_template, as_json)  # fmt: skip
        return
    if prepared:
        prepared.check_tokenizer(load_tokenizer(tokenizer, model, tqdm_class=hub_progress_class()))
        tokens = np.asarray(prepared.validation())
    else:
        tokens = data.load_tokens(
            files, load_tokenizer(tokenizer, model, tqdm_class=hub_progress_class()), errors=errors
        )
    length = seq_length or config.n_positions
    _check_memory(config, batch_size, length, dtype)
    with task_progress() as progress, flags_for({"stride", "batch_size"}, length="--seq-length"):
        task = progress.add_task("evaluating", total=None)
        result = evaluation.evaluate(
            config,
            params,
            tokens,
            length=length,
            stride=stride or length,
            batch_size=batch_size,
            dtype=dtype,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if not math.isfinite(result.loss):
        raise UserError(
            f"the loss came out {result.loss}: the model's outputs are not finite numbers on this "
            "text (with --dtype float16 or bfloat16, try float32)"
        )
    figures = {
        "loss": result.loss,
        "perplexity": result.perplexity,
        "tokens_scored": result.n_tokens,
        "windows": result.n_windows,
        "seq_length": length,
        "stride": stride or length,
    }
    if as_json:
        typer.echo(
            json.dumps(
                figures if math.isfinite(result.perplexity) else {**figures, "perplexity": None}
            )
        )
    else:
        typer.echo(
            f"loss {result.loss:.4f}  perplexity {result.perplexity:.4f}  "
            f"({result.n_tokens} tokens in {result.n_windows} windows of {length}, stride {stride or length})"
        )


def _score_task(
    path: str,
    model: str,
    tokenizer: str | None,
    batch_size: int,
    dtype: str,
    as_json: bool,
    adapter: Path | None,
) -> None:
    """acc and acc_norm of the model on a task file; with --json, a line per item first."""
    from gpt2cli import compile_cache
    from gpt2cli.hub import load_model, load_tokenizer
    from gpt2cli.progress import hub_progress_class, task_progress
    from gpt2cli.scoring import Scorer
    from gpt2cli.training import tasks

    items = tasks.read_task(path)
    compile_cache.enable()
    config, params = load_model(
        model, finite=True, tqdm_class=hub_progress_class(), adapter=adapter
    )
    tok = load_tokenizer(tokenizer, model, tqdm_class=hub_progress_class())
    _check_memory(config, batch_size, config.n_positions, dtype)
    scorer = Scorer(config, params, dtype, batch_tokens=batch_size * config.n_positions)
    with task_progress() as progress:
        bar = progress.add_task("scoring choices", total=sum(len(i.choices) for i in items))
        results = tasks.score_items(
            scorer, tok, items, progress=lambda rows: progress.advance(bar, rows)
        )
    if not all(math.isfinite(x) for r in results for x in r.logprobs):
        raise UserError(
            "a choice's log-probability came out not finite: the model's outputs are not finite "
            "numbers on this task (with --dtype float16 or bfloat16, try float32)"
        )
    n = len(results)
    acc, acc_norm = tasks.accuracy(results)
    if not as_json:
        typer.echo(f"acc {acc:.4f}  acc_norm {acc_norm:.4f}  ({n} items)")
        return
    for index, r in enumerate(results):
        line = {
            "item": index,
            "logprobs": list(r.logprobs),
            "pred": r.pred,
            "pred_norm": r.pred_norm,
            "answer": r.answer,
            "acc": r.acc,
            "acc_norm": r.acc_norm,
        }
        typer.echo(json.dumps(line))
    typer.echo(json.dumps({"acc": acc, "acc_norm": acc_norm, "n": n}))


def _score_examples(
    files,
    config,
    params,
    model,
    tokenizer,
    seq_length,
    batch_size,
    dtype,
    mask_prompt,
    chat_template,
    as_json,
) -> None:
    """The loss over the counted tokens of instruction or chat rows, one example a row: every
    row of the files, or every example of a folder `gpt2 prepare` wrote (with its own mask)."""
    from gpt2cli.chat import template
    from gpt2cli.hub import load_tokenizer
    from gpt2cli.progress import hub_progress_class, task_progress
    from gpt2cli.training import data, examples
    from gpt2cli.training import evaluate as evaluation

    tok = load_tokenizer(tokenizer, model, tqdm_class=hub_progress_class())
    length = seq_length or config.n_positions
    if examples.is_prepared_examples(files[0]):
        fingerprint = data.tokenizer_fingerprint(tok)
        spec, rows = examples.read_prepared(files[0], fingerprint, length + 1)
        if mask_prompt and not spec.get("mask_prompt"):
            raise UserError(
                f"--mask-prompt asks for a mask that {files[0]} lacks: prepare it with "
                "--mask-prompt"
            )
    else:
        rows = examples.read_examples(files, template(chat_template), tok,
                                      mask_prompt=mask_prompt, max_tokens=length + 1)  # fmt: skip
    with task_progress() as progress, flags_for({"batch_size"}, length="--seq-length"):
        task = progress.add_task("evaluating", total=None)
        result = evaluation.evaluate_examples(
            config, params, rows, length=length, batch_size=batch_size, dtype=dtype,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )  # fmt: skip
    figures = {"loss": result.loss, "perplexity": result.perplexity,
               "tokens_scored": result.n_tokens, "examples": result.n_windows,
               "examples_cut": rows.cut, "seq_length": length}  # fmt: skip
    if as_json:
        typer.echo(json.dumps(figures))
    else:
        cut = f", {rows.cut} cut to {length + 1} tokens" if rows.cut else ""
        typer.echo(
            f"loss {result.loss:.4f}  perplexity {result.perplexity:.4f}  ({result.n_tokens} "
            f"counted tokens in {result.n_windows} examples{cut})"
        )


def _prepared(names: list[str]):
    """The prepared folder (`gpt2 prepare`) that --dataset names, if it names one."""
    from gpt2cli.training.shards import is_prepared, open_prepared

    if len(names) == 1 and is_prepared(names[0]):
        return open_prepared(names[0])
    return None


def _check_memory(config, batch_size: int, length: int, dtype: str) -> None:
    from gpt2cli.training import memory

    need = memory.scoring_footprint(
        config, rows=batch_size, length=length, compute_bytes=memory.compute_bytes(dtype)
    )
    memory.check_fits(
        need, f"--batch-size {batch_size} x {length} tokens", "--batch-size or --seq-length"
    )
