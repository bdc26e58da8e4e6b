"""`gpt2 convert`: a Hugging Face checkpoint to our .npz, or back to a HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpt2cli.cli.console import err
from gpt2cli.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def convert(
    source: Annotated[str, typer.Argument(help="Model to read: Hub repo id, HF folder or .npz.")],
    dest: Annotated[
        Path,
        typer.Argument(
            help="Output: a .npz file, or a folder with --to hf (weights, config.json, tokenizer "
            "files, generation_config.json)."
        ),
    ],
    to: Annotated[str, typer.Option("--to", help="Output format: npz or hf.")] = "npz",
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Cast weights: float32, bfloat16 or float16.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
) -> None:
    """Convert a checkpoint: Hugging Face safetensors <-> .npz.

    Examples:

    \b
      gpt2 convert gpt2 gpt2.npz
      gpt2 convert ./my-hf-folder out.npz --dtype bfloat16
      gpt2 convert out.npz ./hf-export --to hf
    """
    if to not in ("npz", "hf"):
        raise typer.BadParameter(f"{to!r} is not one of: npz, hf", param_hint="--to")
    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(
            f"{dtype!r} is not one of: {', '.join(DTYPES)}", param_hint="--dtype"
        )
    if to == "hf" and dest.suffix == ".npz":
        raise typer.BadParameter(
            f"{dest} looks like a file; --to hf writes a folder", param_hint="DEST"
        )
    if to == "npz" and dest.exists() and not dest.is_dir() and not force:
        raise UserError(f"{dest} already exists (use --force to overwrite)")

    from gpt2cli.hub import load_model
    from gpt2cli.progress import hub_progress_class

    with err.status(f"reading {source}"):
        config, params = load_model(source, tqdm_class=hub_progress_class())
    if dtype is not None:
        params = _cast(params, dtype)
    with err.status(f"writing {dest}"):
        written = _write(dest, to, config, params, force, source)
    err.print(f"wrote {written} ({config.num_params():,} parameters)")
    typer.echo(str(written))


def _cast(params: dict, dtype: str) -> dict:
    import ml_dtypes
    import numpy as np

    from gpt2cli.checkpoint import flatten, unflatten
    from gpt2cli.progress import task_progress

    target = np.dtype(getattr(ml_dtypes, dtype)) if dtype == "bfloat16" else np.dtype(dtype)
    flat = flatten(params)
    with task_progress() as progress:
        task = progress.add_task(f"casting to {dtype}", total=len(flat))
        for name, array in flat.items():
            flat[name] = array.astype(target)
            progress.advance(task)
    return unflatten(flat)


def _write(dest: Path, to: str, config, params: dict, force: bool, source: str) -> Path:
    if to == "hf":  # with the tokenizer: the source folder's own, else GPT-2's bundled one
        from gpt2cli.hub import load_tokenizer
        from gpt2cli.tokenizer import hf_files
        from gpt2cli.weights import save_hf_folder

        tokenizer = hf_files(load_tokenizer(None, source), config.n_positions)
        return save_hf_folder(dest, config, params, force=force, extra=tokenizer)
    from gpt2cli.checkpoint import save_npz

    return save_npz(dest, config, params, force=force)
