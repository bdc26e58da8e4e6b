"""A prepared folder's index.json: written by `gpt2 prepare`, read by train and eval.

The index lists the shard files with their token counts, sha256 and where the work stood after
each, the sources they came from, the validation split and the tokenizer. Reading it checks
every field and that the counts agree with each other and with the folder, so a damaged or
hand-edited index is one line naming the file and the field, never a wrong number of tokens or
a read outside the folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2cli.errors import UserError
from gpt2cli.fields import check_types
from gpt2cli.headers import check_header, read_json

FORMAT = "gpt2cli-tokens"
VERSION = 1
INDEX = "index.json"
DTYPE = np.dtype("<u2")
FIX = ": prepare the dataset again"
_READ = 1 << 24  # bytes of a shard read at a time when checking it


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def build_index(
    request: dict[str, Any],
    shards: list[dict[str, Any]],
    sources: list[dict[str, Any]],
    documents: int,
    val_fraction: float,
    eos_id: int,
) -> dict[str, Any]:
    total = sum(s["tokens"] for s in shards)
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "uint16",
        "tokenizer": {"name": "gpt2", "fingerprint": request["tokenizer"], "eos_id": eos_id},
        "documents": documents,
        "tokens": total,
        "document_separator": "eos",  # <|endoftext|> between documents, as gpt2 train joins files
        "split": {"val_fraction": val_fraction, "val_start": _val_start(total, val_fraction)},
        "sources": sources,
        "shards": shards,
        "request": request,
    }


def _val_start(tokens: int, val_fraction: float) -> int:
    return tokens - int(tokens * val_fraction)


# ---- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Index:
    dtype: str
    tokenizer: dict
    documents: int
    tokens: int
    split: dict
    sources: list
    shards: list


@dataclass(frozen=True)
class _Tokenizer:
    fingerprint: str
    eos_id: int


@dataclass(frozen=True)
class _Split:
    val_fraction: float
    val_start: int


@dataclass(frozen=True)
class _Source:
    sha256: str
    tokens: int


@dataclass(frozen=True)
class _Shard:
    file: str
    tokens: int
    sha256: str | None = None  # an index written before gpt2 kept shard checksums has none
    after: dict | None = None  # where the work stood after it (then too)


@dataclass(frozen=True)
class _After:
    sources: int
    offset: int
    line: int
    source_tokens: int
    source_docs: int
    documents: int


def read_index(folder: Path) -> dict[str, Any]:
    """The index.json that `build_index` wrote into `folder`, every field checked."""
    index, problem = _read(folder)
    if problem:
        raise UserError(f"{problem}{FIX}")
    return index


def _read(folder: Path) -> tuple[dict[str, Any], str | None]:
    """The index, and what disagrees in it or with the folder (None: nothing)."""
    file = folder / INDEX
    index = check_header(
        read_json(file),
        file,
        format=FORMAT,
        version=VERSION,
        what="an index written by gpt2 prepare",
        fix=FIX,
    )
    try:
        _check_fields(index, file)
        _check_counts(index, file)
        _check_folder(index, folder, file)
    except UserError as exc:
        return index, str(exc)
    return index, None


def _check_fields(index: dict[str, Any], file: Path) -> None:
    _check_object(_Index, index, f"{file}: ")
    _check_object(_Tokenizer, index["tokenizer"], f"{file}: tokenizer.")
    _check_object(_Split, index["split"], f"{file}: split.")
    for i, source in enumerate(index["sources"]):
        _check_object(_Source, source, f"{file}: sources[{i}].")
    for i, shard in enumerate(index["shards"]):
        _check_object(_Shard, shard, f"{file}: shards[{i}].")
        if shard.get("after") is not None:
            _check_object(_After, shard["after"], f"{file}: shards[{i}].after.")


def _check_object(kind: type, value: Any, where: str) -> None:
    """`value` is a JSON object holding `kind`'s fields, each of its type."""
    if not isinstance(value, dict):
        raise UserError(f"{where.rstrip('. ')} must be an object, got {value!r}")
    for name in (f.name for f in dataclasses.fields(kind) if f.default is dataclasses.MISSING):
        if name not in value:
            raise UserError(f"{where}{name} is missing")
    check_types(kind, value, where)


def _check_counts(index: dict[str, Any], file: Path) -> None:
    if index["dtype"] != "uint16":
        raise UserError(f"{file}: dtype must be 'uint16', got {index['dtype']!r}")
    tokens, split = index["tokens"], index["split"]
    for i, shard in enumerate(index["shards"]):
        if shard["tokens"] < 1:
            raise UserError(f"{file}: shards[{i}].tokens must be positive, got {shard['tokens']}")
    for what in ("shards", "sources"):
        held = sum(part["tokens"] for part in index[what])
        if held != tokens:
            raise UserError(f"{file}: tokens is {tokens} but its {what} hold {held}")
    if not 0.0 <= split["val_fraction"] < 1.0:
        raise UserError(
            f"{file}: split.val_fraction must be in [0, 1), got {split['val_fraction']}"
        )
    if split["val_start"] != _val_start(tokens, split["val_fraction"]):
        raise UserError(
            f"{file}: split.val_start is {split['val_start']} but val_fraction "
            f"{split['val_fraction']} of {tokens} tokens starts at "
            f"{_val_start(tokens, split['val_fraction'])}"
        )


def _check_folder(index: dict[str, Any], folder: Path, file: Path) -> None:
    """Each shard is a file of the folder, listed once, and every shard file is listed."""
    listed = [shard["file"] for shard in index["shards"]]
    for i, name in enumerate(listed):
        if name in ("", ".", "..") or Path(name).name != name:
            raise UserError(f"{file}: shards[{i}].file {name!r} is not a file name in {folder}")
        if name in listed[:i]:
            raise UserError(f"{file}: shards[{i}].file {name!r} is listed twice")
    unlisted = sorted({p.name for p in folder.glob("shard-*.bin")} - set(listed))
    if unlisted:
        raise UserError(f"{file}: shards does not list {unlisted[0]}, which is in {folder}")


# ---- the shards ----------------------------------------------------------------------------


def vocabulary_problem(ids: np.ndarray, vocab_size: int, where: str, first: int = 0) -> str | None:
    """Why `ids` (tokens `first`.. of `where`) cannot be GPT-2's; None when all lie in its
    vocabulary. A max per read: cheap beside the read itself."""
    if len(ids) == 0 or int(ids.max()) < vocab_size:
        return None
    at = int(np.argmax(ids >= vocab_size))
    return (
        f"{where} has token id {int(ids[at])} at token {first + at} but its tokenizer's "
        f"vocabulary has {vocab_size} ids: token ids must lie in [0, {vocab_size})"
    )


def size_problem(path: Path, tokens: int) -> str | None:
    """Why shard file `path` cannot hold `tokens` tokens; None when its size is right."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != tokens * DTYPE.itemsize:
        return f"{path} has {size} bytes, not the {tokens * DTYPE.itemsize} its index says"
    return None


@dataclass(frozen=True)
class Damage:
    problem: str  # what is wrong, naming the file
    good_shards: int  # the shards before the first damaged one (0: the index itself is wrong)


def damage(folder: Path, vocab_size: int) -> Damage | None:
    """What is wrong with a prepared folder (its index, a shard's size or contents), or None.

    Reads every shard: its ids must lie in the vocabulary, and its bytes match the sha256 the
    index lists (an index written before gpt2 kept shard checksums lists none).
    """
    index, problem = _read(folder)
    if problem:
        return Damage(problem, 0)
    for number, shard in enumerate(index["shards"]):
        path = folder / shard["file"]
        problem = size_problem(path, shard["tokens"]) or _content_problem(
            path, shard.get("sha256"), vocab_size
        )
        if problem:
            return Damage(problem, number)
    return None


def _content_problem(path: Path, sha256: str | None, vocab_size: int) -> str | None:
    digest, read = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_READ):
            digest.update(block)
            ids = np.frombuffer(block, DTYPE)
            problem = vocabulary_problem(ids, vocab_size, str(path), read)
            if problem:
                return problem
            read += len(ids)
    if sha256 is not None and digest.hexdigest() != sha256:
        return f"{path} does not match the sha256 its index lists"
    return None
