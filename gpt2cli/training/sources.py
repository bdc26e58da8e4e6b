"""Input files of `gpt2 prepare` as streams of pieces: text that tokenizes on its own.

A plain text file is one document; a JSON-lines file (`.jsonl`, `.ndjson`) holds one document
per line in a string field. Either may be gzip-compressed (`.gz`). A source is read in blocks
and cut into pieces of about `PIECE_BYTES` that tokenize exactly as the whole text would (but
in a long stretch without a space or punctuation mark: see `text_cut`), so memory stays bounded
for any text and the pieces can be tokenized in parallel; `bounded_runs` bounds the tokenizer's
own memory the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt2cli.errors import UserError

PIECE_BYTES = 1 << 20
RUN_CHARS = 1 << 15  # the tokenizer gets at most twice this many characters at once
_BLOCK = 1 << 20

# A cut just before a space or newline that sits between two printable ASCII characters
# changes no token: GPT-2's pre-tokenizer ends a word, number or punctuation run at the
# space or newline, and the space (or newline) starts the next piece as it would have anyway.
_SPACE = r"[\x21-\x7e](?=[ \n][\x21-\x7e])"
# Text without spaces (Chinese, Japanese) has no such cut. A cut between a letter or digit and a
# non-ASCII punctuation mark or symbol that follows it (。、「！) changes no token either: the
# pre-tokenizer ends a run of letters or of digits there, and the mark starts the next pre-token
# wherever the text begins. (ASCII marks are left out so "<|endoftext|>" is never cut.)
_MARK = r"[^\W_](?=[^\w\s\x00-\x7f])"
_SAFE_CUT = re.compile(_SPACE.encode())
_SCRIPT_CUT = re.compile(_MARK)
_ANY_CUT = re.compile(f"{_SPACE}|{_MARK}")


def kind_of(path: Path) -> str:
    """'jsonl' or 'text', from the name (a trailing .gz aside)."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return "jsonl" if name.endswith((".jsonl", ".ndjson")) else "text"


@dataclass(frozen=True)
class Piece:
    """A run of one source's bytes that tokenizes on its own.

    kind 'text': `data` is part of one document (`starts_doc`: its first piece).
    kind 'jsonl': `data` is whole lines, one document each; `first_line` is 1-based.
    `end` is the offset (in the uncompressed stream) just past the piece; `read` the bytes
    of the file on disk consumed so far (for progress).
    """

    kind: str
    data: bytes
    starts_doc: bool
    end: int
    read: int
    first_line: int = 1


class _HashingReader(io.RawIOBase):
    """Reads a file while hashing its bytes as stored (compressed or not)."""

    def __init__(self, path: Path):
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
        self.sha256 = hashlib.sha256()
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        self.sha256.update(memoryview(buffer)[:n])
        self.consumed += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


class SourceReader:
    """One input file: its pieces from a given offset, and its sha256 once fully read."""

    def __init__(self, path: Path):
        self.path = path
        self.kind = kind_of(path)
        self._raw = _HashingReader(path)
        reader = io.BufferedReader(self._raw, _BLOCK)
        self._stream = gzip.GzipFile(fileobj=reader) if path.name.endswith(".gz") else reader

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc) -> None:
        self._raw.close()

    @property
    def sha256(self) -> str:
        return self._raw.sha256.hexdigest()

    @property
    def consumed(self) -> int:
        return self._raw.consumed

    def _read(self, n: int) -> bytes:
        try:
            return self._stream.read(n)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise UserError(f"cannot read {self.path}: {exc} (corrupt or truncated .gz?)") from None

    def pieces(self, start: int = 0, first_line: int = 1) -> Iterator[Piece]:
        """Pieces after uncompressed offset `start` (where an interrupted run stopped)."""
        skipped = 0
        while skipped < start:
            block = self._read(min(_BLOCK, start - skipped))
            if not block:
                raise UserError(f"{self.path} is shorter than when it was first read")
            skipped += len(block)
        buffer, offset, line, starts_doc = b"", start, first_line, start == 0
        eof = False
        while not eof or buffer:
            while not eof and len(buffer) < 2 * PIECE_BYTES:
                block = self._read(_BLOCK)
                eof = not block
                buffer += block
            cut = len(buffer) if eof else self._cut(buffer)
            if cut is None:  # a JSON line longer than the buffer: read on
                block = self._read(_BLOCK)
                eof = not block
                buffer += block
                continue
            data, buffer = buffer[:cut], buffer[cut:]
            offset += len(data)
            if data:
                yield Piece(self.kind, data, starts_doc, offset, self.consumed, line)
                starts_doc = False
                if self.kind == "jsonl":
                    line += data.count(b"\n")
        while self._read(_BLOCK):  # hash any trailing bytes
            pass

    def _cut(self, buffer: bytes) -> int | None:
        if self.kind == "jsonl":
            at = buffer.find(b"\n", PIECE_BYTES)
            return None if at < 0 else at + 1
        return text_cut(buffer, PIECE_BYTES)


def text_cut(buffer: bytes, size: int) -> int:
    """Where to end a text piece of at least `size` bytes (`buffer` holds more than that).

    A cut that changes no token (a space, else a punctuation mark after a word) in the rest of
    the buffer; failing both, the first character boundary past `size`. That last cut falls
    inside a stretch of more than `size` bytes with neither (a long run of letters), so tokens
    next to it may differ from one pass over the whole text (a token split in two), as if a
    zero-width space stood there. Prose never gets it; it is what bounds memory for any text.
    """
    match = _SAFE_CUT.search(buffer, size)
    if match:
        return match.end()
    start = _char_start(buffer, size)
    end = _char_start(buffer, len(buffer) - 4)  # the last character may be incomplete: leave it
    window = buffer[start:end].decode("utf-8", errors="surrogateescape")
    mark = _SCRIPT_CUT.search(window)
    if mark:
        return start + len(window[: mark.end()].encode("utf-8", errors="surrogateescape"))
    return start


def bounded_runs(text: str, size: int = RUN_CHARS) -> list[str]:
    """`text` in parts of at most 2 * `size` characters, cut where no token changes.

    The tokenizer's memory grows with its longest pre-token: about 40 MB for a 1 MB run of
    letters. A stretch of more than `size` characters with no cut that changes no token is cut
    at `size`, where a token may split in two (as `text_cut` says).
    """
    parts, start = [], 0
    while len(text) - start > 2 * size:
        found = _ANY_CUT.search(text, start + size, start + 2 * size)
        cut = found.end() if found else start + size
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


def _char_start(buffer: bytes, at: int) -> int:
    """The first offset from `at` that does not continue a UTF-8 character."""
    while at < len(buffer) and buffer[at] & 0xC0 == 0x80:
        at += 1
    return at


class BadInput(Exception):
    """A piece's bad byte or line: `index` is a byte offset (text) or line (jsonl) in it."""

    def __init__(self, index: int, reason: str):
        super().__init__(index, reason)
        self.index, self.reason = index, reason

    def describe(self, piece: Piece, path: Path) -> str:
        if piece.kind == "text":
            at = piece.end - len(piece.data) + self.index
            return f"{path} {self.reason} at offset {at} (convert it, or pass --errors replace)"
        return f"{path} line {piece.first_line + self.index} {self.reason}"


def piece_texts(piece: Piece, text_field: str, errors: str) -> list[str]:
    """The documents (jsonl) or the text (one document's part) of a piece."""
    if piece.kind == "text":
        try:
            return [piece.data.decode("utf-8", errors=errors)]
        except UnicodeDecodeError as exc:
            bad = piece.data[exc.start]
            raise BadInput(exc.start, f"is not UTF-8 text: byte 0x{bad:02x}") from None
    texts = []
    for i, line in enumerate(piece.data.split(b"\n")):
        if not line.strip():
            continue
        record = json_line(line, i, errors)
        if not isinstance(record, dict) or text_field not in record:
            raise BadInput(i, f"has no field {text_field!r} (choose one with --text-field)")
        if not isinstance(record[text_field], str):
            raise BadInput(i, f"field {text_field!r} is not a string")
        texts.append(_without_surrogates(record[text_field], i, text_field, errors))
    return texts


def json_line(line: bytes, i: int, errors: str):
    """The JSON value of line `i` of a piece; what Python's reader refuses is a BadInput."""
    try:
        return json.loads(line.decode("utf-8", errors=errors))
    except UnicodeDecodeError:
        raise BadInput(i, "is not UTF-8 (pass --errors replace)") from None
    except json.JSONDecodeError as exc:
        raise BadInput(i, f"is not JSON ({exc.msg})") from None
    except RecursionError:
        raise BadInput(i, "is nested too deeply to read as JSON") from None
    except ValueError:  # the only other ValueError: Python's limit on an integer's digits
        limit = sys.get_int_max_str_digits()
        raise BadInput(i, f"has a number of more than {limit} digits") from None


# A JSON escape such as "\ud800" gives half of a UTF-16 pair: no character, not encodable
_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(text: str, i: int, text_field: str, errors: str) -> str:
    """`text`, refused (strict) or with U+FFFD (replace) where a lone surrogate stands."""
    if errors == "replace":
        return _SURROGATE.sub("\ufffd", text)
    found = _SURROGATE.search(text)
    if found:
        code = f"\\u{ord(found.group()):04x}"
        raise BadInput(
            i, f"field {text_field!r} holds a lone surrogate {code} (pass --errors replace)"
        )
    return text
