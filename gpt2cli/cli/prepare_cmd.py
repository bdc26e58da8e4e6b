"""`gpt2 prepare`: tokenize text once into uint16 shards that `gpt2 train --dataset` memory-maps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from gpt2cli.cli import interrupts
from gpt2cli.cli.console import err
from gpt2cli.cli.options import flags_for
from gpt2cli.errors import UserError
from gpt2cli.training.settings import PrepareSettings, help_of

Opt = typer.Option


def prepare(
    files: Annotated[
        list[str],
        typer.Argument(
            metavar="FILES_OR_GLOBS...",
            help="Text files (one document each) or .jsonl (one per line), optionally .gz.",
            show_default=False,
        ),
    ],
    out: Annotated[str, Opt("--out", "-o", help="Folder for the shards and index.json.")],
    text_field: Annotated[
        str, Opt("--text-field", help=help_of(PrepareSettings, "text_field"))
    ] = PrepareSettings.text_field,
    workers: Annotated[
        int | None,
        Opt("--workers", "-j", min=1, help="Tokenizing processes [default: all cores]."),
    ] = None,
    shard_tokens: Annotated[
        int, Opt("--shard-tokens", help=help_of(PrepareSettings, "shard_tokens"))
    ] = PrepareSettings.shard_tokens,
    val_fraction: Annotated[
        float, Opt("--val-fraction", help=help_of(PrepareSettings, "val_fraction"))
    ] = PrepareSettings.val_fraction,
    errors: Annotated[
        str, Opt("--errors", help=help_of(PrepareSettings, "errors"))
    ] = PrepareSettings.errors,
    force: Annotated[
        bool, Opt("--force", help="Replace a folder prepared from other inputs or settings.")
    ] = False,
    mask_prompt: Annotated[
        bool,
        Opt("--mask-prompt", help="Instruction or chat rows: the loss will count only replies."),
    ] = False,
    chat_template: Annotated[
        str, Opt("--chat-template", help="The template chat rows are written in.")
    ] = "chat",
) -> None:
    """Tokenize text into flat uint16 shards for gpt2 train --dataset DIR.

    Memory stays bounded whatever the corpus size; Ctrl-C keeps every finished shard, and
    running the same command again finishes only what is missing.

    Examples:

    \b
      gpt2 prepare 'corpus/*.txt' --out data/corpus
      gpt2 prepare web-*.jsonl.gz --text-field text --out data/web --workers 8
      gpt2 train --dataset data/corpus --init tiny --steps 1000
      gpt2 prepare chats.jsonl --mask-prompt --out data/sft     # rows and their loss mask
    """
    from gpt2cli.training.data import resolve_files
    from gpt2cli.training.examples import is_examples
    from gpt2cli.training.prepare import FolderInUse
    from gpt2cli.training.prepare import prepare as run

    with flags_for(PrepareSettings.__dataclass_fields__):
        settings = PrepareSettings(text_field, errors, shard_tokens, val_fraction)
    paths = resolve_files(files, os.environ.get("DATA_DIR"))
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the prepared dataset")
    with flags_for({"mask_prompt"}):
        rows = is_examples(paths, mask_prompt)
    if rows:
        _prepare_examples(paths, Path(out), mask_prompt, chat_template, force)
        return
    try:
        with _Bar() as bar:
            result = run(paths, Path(out), settings, workers=workers, force=force, progress=bar)
    except FolderInUse as exc:
        raise UserError(f"{exc}: use --force to replace them, or another --out") from None
    except KeyboardInterrupt as exc:
        err.print(
            f"interrupted: finished shards are kept in {out}; run the same command to go on",
            soft_wrap=True,
        )
        raise typer.Exit(interrupts.exit_code(exc)) from None
    index = result.index
    what = "already prepared" if result.resumed_at is None else "prepared"
    if result.repaired:
        err.print(f"{result.repaired}: prepared again", markup=False, soft_wrap=True)
    docs, shards = index["documents"], len(index["shards"])
    err.print(
        f"{what}: {index['tokens']:,} tokens of {docs:,} document{'s' * (docs != 1)} in "
        f"{shards} shard{'s' * (shards != 1)} under {out}",
        soft_wrap=True,
    )


def _prepare_examples(paths, out: Path, mask_prompt: bool, template_name: str, force: bool):
    """Instruction or chat rows -> examples.npz (ids and loss mask) and examples.json."""
    from gpt2cli.chat import template
    from gpt2cli.tokenizer import bundled
    from gpt2cli.training import examples
    from gpt2cli.training.data import tokenizer_fingerprint

    chosen = template(template_name)
    if examples.is_prepared_examples(out) and not force:
        raise UserError(f"{out} already holds prepared examples: use --force to replace them")
    tok = bundled()
    rows = examples.read_examples(
        paths, chosen, tok, mask_prompt=mask_prompt, max_tokens=2**31
    )  # cut by gpt2 train, to its --seq-length
    examples.write_prepared(out, rows, mask_prompt=mask_prompt, template=chosen.name,
                            tokenizer=tokenizer_fingerprint(tok),
                            sources=[str(p.resolve()) for p in paths])  # fmt: skip
    counted = int(rows.counts.sum())
    err.print(
        f"prepared: {len(rows):,} examples, {len(rows.ids):,} tokens ({counted:,} counted in the "
        f"loss) under {out}",
        soft_wrap=True,
    )


class _Bar:
    """A progress bar over the input bytes, with MB/s and the time left."""

    def __init__(self) -> None:
        from gpt2cli.progress import bytes_progress

        self.progress = bytes_progress(err)
        self.task = self.progress.add_task("tokenizing", total=None)

    def __call__(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
