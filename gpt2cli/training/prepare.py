"""`gpt2 prepare`'s core: tokenize input files once into flat uint16 shards and an index.

The folder holds `shard-00000.bin`, ... (GPT-2 ids as little-endian uint16, documents joined
by <|endoftext|>, exactly the stream `gpt2 train` makes of the same files) and `index.json`
(sources with sizes and hashes, counts, the validation split, the tokenizer's fingerprint).

Worker processes tokenize pieces of the inputs (see sources.py) while this process reads
ahead a bounded number of pieces and writes the results in order, so memory stays bounded.
A shard is written under a temporary name and renamed when complete; `.progress.json`
records where the last complete shard ended, so an interrupted run continues from there. The
index keeps that record for every shard, so a shard found damaged later is made again from
where it began (with the shards after it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from gpt2cli.atomic import atomic_write
from gpt2cli.errors import UserError
from gpt2cli.headers import read_json
from gpt2cli.training.index import DTYPE, INDEX, build_index, damage, read_index, shard_name
from gpt2cli.training.settings import PrepareSettings
from gpt2cli.training.sources import (
    BadInput,
    Piece,
    SourceReader,
    bounded_runs,
    kind_of,
    piece_texts,
)

PROGRESS = ".progress.json"

Progress = Callable[[int, int], None]  # (bytes of input read, bytes in all)


class FolderInUse(UserError):
    """The output folder holds another request's tokens (`force` replaces them)."""


def tokenizer_fingerprint() -> str:
    """The bundled GPT-2 tokenizer's fingerprint, as the plain-text path computes it."""
    from gpt2cli.tokenizer import bundled
    from gpt2cli.training.data import tokenizer_fingerprint as fingerprint

    return fingerprint(bundled())


def _request(files: list[Path], settings: PrepareSettings) -> dict[str, Any]:
    """What a rerun must match to continue (or to find the work already done)."""
    sources = []
    for path in files:
        stat = path.stat()
        sources.append(
            {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        )
    return {
        "sources": sources,
        "tokenizer": tokenizer_fingerprint(),
        **dataclasses.asdict(settings),
    }


# ---- workers -----------------------------------------------------------------------------

_encoder = None


def _init_worker() -> None:
    global _encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    from gpt2cli.tokenizer import bundled_files, fast_encoder

    _encoder = fast_encoder(bundled_files()[0])


def encode_piece(piece: Piece, text_field: str, errors: str, eos: int):
    """(uint16 ids, documents begun in it) of one piece; documents joined by eos."""
    texts = piece_texts(piece, text_field, errors)
    parts: list[np.ndarray] = []
    for i, text in enumerate(texts):
        if i:
            parts.append(np.asarray([eos], DTYPE))
        for run in bounded_runs(text):
            parts.append(_encoder.encode_to_numpy(run, allowed_special="all").astype(DTYPE))
    docs = int(piece.starts_doc) if piece.kind == "text" else len(texts)
    return (np.concatenate(parts) if parts else np.empty(0, DTYPE)), docs


# ---- state ---------------------------------------------------------------------------------


@dataclass
class _State:
    """Where the work stands: complete shards, finished sources, and the resume point."""

    shards: list[dict[str, Any]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)  # finished ones
    offset: int = 0  # in the current source (sources[len(self.sources)])
    line: int = 1
    source_tokens: int = 0
    source_docs: int = 0
    documents: int = 0  # in all sources so far

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def close_shard(self, shard: dict[str, Any]) -> None:
        """Add a finished shard, with where the work stood after it (for `before_shard`)."""
        after = {"sources": len(self.sources), "offset": self.offset, "line": self.line}
        after |= {"source_tokens": self.source_tokens, "source_docs": self.source_docs}
        self.shards.append({**shard, "after": after | {"documents": self.documents}})

    @classmethod
    def before_shard(cls, index: dict[str, Any], number: int) -> _State:
        """Where the work stood when shard `number` of a finished index began (the start when
        it is the first, or the index is older than the shards' "after")."""
        if number == 0 or "after" not in index["shards"][number - 1]:
            return cls()
        after = dict(index["shards"][number - 1]["after"])
        finished = index["sources"][: after.pop("sources")]
        return cls(shards=index["shards"][:number], sources=finished, **after)


class _ShardWriter:
    """Appends ids to a temporary shard file, hashing them; `close` renames it into place."""

    def __init__(self, folder: Path, number: int):
        self.folder, self.number, self.tokens, self._file = folder, number, 0, None
        self._sha256 = hashlib.sha256()

    @property
    def _tmp(self) -> Path:
        return self.folder / f".{shard_name(self.number)}.tmp"

    def write(self, ids: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close/abort
        self._file.write(memoryview(ids))
        self._sha256.update(memoryview(ids))
        self.tokens += len(ids)

    def close(self) -> dict[str, Any] | None:
        """Finish the shard (None when nothing was written) and start the next."""
        if self._file is None:
            return None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.folder / shard_name(self.number))
        done = {
            "file": shard_name(self.number),
            "tokens": self.tokens,
            "sha256": self._sha256.hexdigest(),
        }
        self.number, self.tokens, self._sha256 = self.number + 1, 0, hashlib.sha256()
        return done

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)


# ---- the run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    index: dict[str, Any]
    resumed_at: int | None  # tokens already there when this call started; None if all done
    repaired: str | None = None  # what was wrong with the folder this call prepared again


def prepare(
    files: list[Path],
    out: Path,
    settings: PrepareSettings = PrepareSettings(),  # noqa: B008 - frozen
    *,
    workers: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Prepared:
    """Tokenize `files` into `out`; continue an interrupted run of the same request."""
    if not files:
        raise UserError("files: give at least one input file")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"workers must be a positive integer, got {workers}")
    request, out = _request(files, settings), Path(out)
    made = _make_folder(out)
    try:
        damaged = None
        if not force and _holds(out, request):
            damaged = damage(out, _vocab_size())
            if damaged is None:
                return Prepared(read_index(out), None)
            _go_back(out, request, damaged.good_shards)
        state = _open_folder(out, request, force)
        resumed_at = state.tokens
        _run(files, out, settings, request, state, workers, progress)
        index = _index(request, state, settings)
        _write_json(out / INDEX, index)
    except Exception:  # Ctrl-C is no failure: the shards it kept let the same command go on
        _unmake(made)
        raise
    (out / PROGRESS).unlink(missing_ok=True)
    return Prepared(index, resumed_at, damaged and damaged.problem)


def _holds(out: Path, request: dict[str, Any]) -> bool:
    """Whether `out` has an index of this very request (its shards may be damaged)."""
    index = _read_json(out / INDEX)
    return index is not None and index.get("request") == request


def _go_back(out: Path, request: dict[str, Any], good_shards: int) -> None:
    """Turn a damaged folder back into an interrupted run that kept its first `good_shards`."""
    state = _State.before_shard(read_json(out / INDEX), good_shards)
    _write_json(out / PROGRESS, {"request": request, "state": state.__dict__})
    (out / INDEX).unlink()


def _make_folder(out: Path) -> list[Path]:
    """Create `out` and its missing parents; return those it created, `out` first."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out {out} is a file; give a folder for the prepared dataset")
    made = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _unmake(made)  # the parents it made before it failed
        raise UserError(f"cannot make the folder {out}: {exc.strerror}") from None
    return made


def _unmake(made: list[Path]) -> None:
    """Remove the folders a failed call created, with the files it wrote in them."""
    if made and made[0].is_dir():
        _remove([p for p in made[0].iterdir() if _is_ours(p.name)])
    for folder in filter(Path.is_dir, made):  # mkdir may have failed below some of them
        try:
            folder.rmdir()
        except OSError:  # something else was put there meanwhile: leave it
            return


def _open_folder(out: Path, request: dict[str, Any], force: bool) -> _State:
    """The state to continue from (a fresh one when `force` or nothing is there to go on)."""
    index, saved = _read_json(out / INDEX), _read_json(out / PROGRESS)
    if index is not None and not force:
        raise FolderInUse(f"{out} holds tokens of other inputs or settings")
    ours = [p for p in out.iterdir() if _is_ours(p.name)]
    if index is None and saved is None and len(ours) < len(list(out.iterdir())):
        raise UserError(f"out {out} is a folder with other files; give an empty or new folder")
    if saved is not None and saved.get("request") == request and not force:
        state = _State(**saved["state"])
        kept = {s["file"] for s in state.shards}
        _remove(
            [p for p in ours if p.name.startswith((".shard-", "shard-")) and p.name not in kept]
        )
        return state
    _remove(ours)
    return _State()


def _is_ours(name: str) -> bool:
    return name in (INDEX, PROGRESS) or name.startswith(("shard-", ".shard-", f".{PROGRESS}"))


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _run(files, out, settings, request, state: _State, workers: int, progress) -> None:
    eos = _eos_id()
    total = sum(s["bytes"] for s in request["sources"])
    done_before = sum(s["bytes"] for s in request["sources"][: len(state.sources)])
    writer = _ShardWriter(out, len(state.shards))
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker)
    try:
        for number in range(len(state.sources), len(files)):
            path = files[number]
            with SourceReader(path) as reader:
                pending: deque = deque()
                pieces = reader.pieces(state.offset, state.line)
                for piece in pieces:
                    pending.append(
                        (
                            piece,
                            pool.submit(
                                encode_piece, piece, settings.text_field, settings.errors, eos
                            ),
                        )
                    )
                    if len(pending) >= 2 * workers:
                        _write(pending.popleft(), writer, state, out, request, settings, path, eos)
                    if progress:
                        progress(done_before + reader.consumed, total)
                while pending:
                    _write(pending.popleft(), writer, state, out, request, settings, path, eos)
                state.sources.append(
                    {
                        **request["sources"][number],
                        "sha256": reader.sha256,
                        "kind": kind_of(path),
                        "documents": state.source_docs,
                        "tokens": state.source_tokens,
                    }
                )
            state.offset, state.line, state.source_tokens, state.source_docs = 0, 1, 0, 0
            done_before += request["sources"][number]["bytes"]
            if progress:
                progress(done_before, total)
        closed = writer.close()
        if closed:
            state.close_shard(closed)
    finally:
        writer.abort()
        pool.shutdown(wait=True, cancel_futures=True)


def _write(item, writer: _ShardWriter, state: _State, out, request, settings, path, eos) -> None:
    piece, future = item
    try:
        ids, docs = future.result()
    except BadInput as exc:
        raise UserError(exc.describe(piece, path)) from None
    if docs and state.documents:  # the piece begins a document: separate it from the last
        writer.write(np.asarray([eos], DTYPE))
        state.source_tokens += 1
    writer.write(ids)
    state.source_tokens += len(ids)
    state.source_docs += docs
    state.documents += docs
    state.offset = piece.end
    state.line = piece.first_line + (piece.data.count(b"\n") if piece.kind == "jsonl" else 0)
    if writer.tokens >= settings.shard_tokens:
        state.close_shard(writer.close())
        _write_json(out / PROGRESS, {"request": request, "state": state.__dict__})


def _index(request: dict[str, Any], state: _State, settings: PrepareSettings) -> dict[str, Any]:
    if state.tokens == 0:
        raise UserError("the inputs hold no text to tokenize")
    return build_index(
        request, state.shards, state.sources, state.documents, settings.val_fraction, _eos_id()
    )


def _eos_id() -> int:
    from gpt2cli.tokenizer import bundled

    return bundled().eos_id


def _vocab_size() -> int:
    from gpt2cli.tokenizer import bundled

    return bundled().vocab_size


def _read_json(path: Path) -> dict[str, Any] | None:
    """What an earlier run left at `path`: None when there is no file or no JSON object."""
    value = read_json(path) if path.exists() else None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    text = json.dumps(value, indent=1) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
