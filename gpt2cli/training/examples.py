"""Instruction and chat data: JSON-lines rows -> examples of their own, with a loss mask.

A file holds rows of one form (mlx-lm's three), told by its first row:

    {"text": "..."}                                  all of it is learned
    {"prompt": "...", "completion": "..."}           a user turn and the assistant's reply
    {"messages": [{"role": "user", "content": "..."}, ...]}   roles system, user, assistant

Prompt/completion and messages rows are written by `chat.render`, the transcript `gpt2 chat`
and `gpt2 serve` show the model, each reply followed by the end-of-turn token; a text row is its
text and `<|endoftext|>`. With `mask_prompt` only the replies' tokens (and their end-of-turn
tokens) count in the loss; without it every token does. Padding never counts.

An example is a row of its own, never packed with another: a batch pads its rows to a length
bucket (a power of two, at most the sequence length), and a longer row is cut to it.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2cli.chat import ROLES, MessageError, Template, render
from gpt2cli.errors import ParameterError, UserError
from gpt2cli.tokenizer import GPT2Tokenizer
from gpt2cli.training.sources import BadInput, json_line

FORMS = {"text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",)}
MIN_BUCKET = 16  # the shortest padded length: fewer shapes to compile


def form_of(record) -> str | None:
    """The form of one JSON row, or None when it has none of the forms' fields."""
    if not isinstance(record, dict):
        return None
    for form, keys in reversed(FORMS.items()):  # messages, then prompt+completion, then text
        if all(key in record for key in keys):
            return form
    return None


def file_form(path: Path) -> str:
    """The form of a JSON-lines file (that of its first row), or 'plain' (not JSON lines)."""
    if not path.name.removesuffix(".gz").endswith((".jsonl", ".ndjson")):
        return "plain"
    for _, record in _rows(path):
        return form_of(record) or "text"
    return "text"


def is_examples(paths: list[Path], mask_prompt: bool) -> bool:
    """Whether the files hold instruction or chat rows (examples of their own), not text."""
    forms = {path: file_form(path) for path in paths}
    rows = [path for path, form in forms.items() if form in ("completion", "chat")]
    if rows:
        plain = [path for path, form in forms.items() if form == "plain"]
        if plain:
            raise UserError(
                f"{plain[0]} is plain text but {rows[0]} holds instruction rows: give text as "
                'JSON-lines rows {"text": ...} beside them'
            )
        return True
    if mask_prompt:
        raise ParameterError(
            "mask_prompt",
            f"needs prompt/completion or messages rows (a .jsonl dataset); {paths[0]} has none",
        )
    return False


def text_rows(path: Path) -> list[str]:
    """The texts of a file of text rows (the packed corpus reads them as documents)."""
    texts = []
    for number, record in _rows(path):
        if form_of(record) != "text":
            raise UserError(f"{path} line {number}: a row of text rows needs a string text")
        if not isinstance(record["text"], str):
            raise UserError(f"{path} line {number}: text must be a string")
        texts.append(record["text"])
    return texts


def _rows(path: Path):
    """(line number, JSON value) of each non-blank line; a line that is not JSON is named."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json_line(line, 0, "strict")
                except BadInput as exc:
                    raise UserError(f"{path} line {number} {exc.reason}") from None
                yield number, record
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _messages(record: dict) -> list[tuple[str, str]]:
    """The (role, content) pairs of a messages row; a BadRow names what is wrong."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRow("messages must be a non-empty list")
    pairs = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRow(f"messages[{i}] must be an object with role and content")
        if message["role"] not in ROLES:
            raise BadRow(f"messages[{i}] has role {message['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(message["content"], str):
            raise BadRow(f"messages[{i}].content must be a string")
        pairs.append((message["role"], message["content"]))
    if not any(role == "assistant" for role, _ in pairs):
        raise BadRow("has no assistant message: nothing to learn")
    return pairs


class BadRow(ValueError):
    pass


def encode_row(form: str, record: dict, template: Template, tokenizer: GPT2Tokenizer):
    """(ids, replies) of one row: its tokens and, per token, whether it is a reply's."""
    if form == "text":
        if not isinstance(record["text"], str):
            raise BadRow("text must be a string")
        ids = tokenizer.encode(record["text"]) + [tokenizer.eos_id]
        return ids, [True] * len(ids)
    if form == "completion":
        for key in FORMS[form]:
            if not isinstance(record[key], str):
                raise BadRow(f"{key} must be a string")
        messages = [("user", record["prompt"]), ("assistant", record["completion"])]
    else:
        messages = _messages(record)
    try:
        rendered = render(messages, template, tokenizer)
    except MessageError as exc:
        where = "" if exc.index is None else f"messages[{exc.index}]: "
        raise BadRow(where + exc.reason) from None
    return rendered.ids, rendered.replies


@dataclass(frozen=True)
class Examples:
    """Examples laid end to end: `ids` [N] and `counts` [N] (1 where the loss counts a token as
    a target), example i being [offsets[i], offsets[i+1]). `cut`: rows shortened to fit."""

    ids: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    cut: int = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        return self.offsets[indices + 1] - self.offsets[indices]

    def subset(self, start: int, stop: int) -> Examples:
        """Examples start..stop-1."""
        a, b = self.offsets[start], self.offsets[stop]
        offsets = self.offsets[start : stop + 1] - a
        return Examples(self.ids[a:b], self.counts[a:b], offsets, self.cut)


def read_examples(
    paths: list[Path],
    template: Template,
    tokenizer: GPT2Tokenizer,
    *,
    mask_prompt: bool,
    max_tokens: int,
) -> Examples:
    """Every row of `paths` as an example of at most `max_tokens` tokens (longer ones are cut,
    and counted in `cut`). A bad row is one UserError naming its file and line."""
    ids, counts, lengths, cut = [], [], [], 0
    for path in paths:
        form = None
        for number, record in _rows(path):
            found = form_of(record)
            if found is None:
                raise UserError(
                    f"{path} line {number}: a row needs text, prompt and completion, or messages"
                )
            if form is None:
                form, first = found, number
            elif found != form:
                raise UserError(
                    f"{path} line {number}: a {found} row in a file of {form} rows (line "
                    f"{first}); give each form its own file"
                )
            try:
                row, replies = encode_row(form, record, template, tokenizer)
            except BadRow as exc:
                raise UserError(f"{path} line {number}: {exc}") from None
            if len(row) > max_tokens:
                row, replies, cut = row[:max_tokens], replies[:max_tokens], cut + 1
            ids.extend(row)
            counts.extend(replies if mask_prompt else [True] * len(row))
            lengths.append(len(row))
        if form is None:
            raise UserError(f"dataset {path} has no rows")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Examples(np.asarray(ids, np.uint32), np.asarray(counts, np.uint8), offsets, cut)


def bucket(length: int, most: int) -> int:
    """The padded length of a batch whose longest example has `length` targets."""
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, most)


def gather(examples: Examples, indices: np.ndarray, length: int, pad: int):
    """(tokens [N, length+1] int32, weights [N, length] float32) of examples `indices`, each
    from position 0, padded with `pad` (weight 0) after its end."""
    tokens = np.full((len(indices), length + 1), pad, np.int32)
    weights = np.zeros((len(indices), length + 1), np.float32)
    for row, i in enumerate(indices):
        a, b = examples.offsets[i], examples.offsets[i + 1]
        tokens[row, : b - a] = examples.ids[a:b]
        weights[row, : b - a] = examples.counts[a:b]
    return tokens, weights[:, 1:]  # a weight belongs to the token predicted, not the input


# ---- a prepared folder of examples -----------------------------------------------------------

PREPARED = "examples.json"  # beside examples.npz: what the arrays hold and how they were made
ARRAYS = "examples.npz"


def is_prepared_examples(folder: str | Path) -> bool:
    return (Path(folder) / PREPARED).is_file()


def write_prepared(folder: Path, ex: Examples, *, mask_prompt: bool, template: str,
                   tokenizer: str, sources: list[str]) -> None:  # fmt: skip
    """examples.npz (ids, counts: the mask, offsets) and examples.json, each written whole."""
    from gpt2cli.atomic import atomic_write

    folder.mkdir(parents=True, exist_ok=True)

    def arrays(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, ids=ex.ids, counts=ex.counts, offsets=ex.offsets)

    atomic_write(folder / ARRAYS, arrays)
    spec = {"format": "gpt2cli-examples", "version": 1, "examples": len(ex),
            "tokens": int(len(ex.ids)), "mask_prompt": mask_prompt, "chat_template": template,
            "tokenizer": tokenizer, "sources": sources}  # fmt: skip
    atomic_write(folder / PREPARED, lambda tmp: tmp.write_text(json.dumps(spec, indent=2) + "\n"))


def read_prepared(folder: Path, tokenizer: str, max_tokens: int) -> tuple[dict, Examples]:
    """(examples.json, the examples cut to `max_tokens`) of a prepared folder, checked."""
    try:
        spec = json.loads((folder / PREPARED).read_text())
        with np.load(folder / ARRAYS, allow_pickle=False) as arrays:
            ids, counts, offsets = arrays["ids"], arrays["counts"], arrays["offsets"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"{folder} is not a readable prepared folder ({exc}): prepare it again"
        ) from None
    if spec.get("format") != "gpt2cli-examples" or spec.get("version") != 1:
        raise UserError(f"{folder / PREPARED} is not version 1 of 'gpt2cli-examples'")
    if spec.get("tokenizer") != tokenizer:
        raise UserError(f"{folder} was prepared with another tokenizer: prepare it again")
    if len(offsets) != spec.get("examples", -1) + 1 or not offsets[-1] == len(ids) == len(counts):
        raise UserError(f"{folder / ARRAYS} does not hold what {PREPARED} says: prepare it again")
    return spec, cut_to(Examples(ids, counts, offsets), max_tokens)


def cut_to(ex: Examples, max_tokens: int) -> Examples:
    """The examples, each cut to at most `max_tokens` tokens (`cut` counts those shortened)."""
    lengths = np.diff(ex.offsets)
    if (lengths <= max_tokens).all():
        return ex
    keep = np.concatenate(
        [np.arange(a, a + min(n, max_tokens)) for a, n in zip(ex.offsets, lengths, strict=False)]
    )
    offsets = np.concatenate([[0], np.cumsum(np.minimum(lengths, max_tokens))]).astype(np.int64)
    return Examples(ex.ids[keep], ex.counts[keep], offsets, int((lengths > max_tokens).sum()))
