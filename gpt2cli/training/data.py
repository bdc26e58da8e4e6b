"""Text files -> token ids -> packed (batch, seq) blocks, with a held-out validation split.

Tokenizing is done once per file content: the ids are cached under the user's cache folder,
keyed by a hash of the file bytes and the tokenizer. Which blocks make up step s's batch is a
pure function of (seed, s), so a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2cli.atomic import atomic_write
from gpt2cli.errors import UserError
from gpt2cli.tokenizer import GPT2Tokenizer
from gpt2cli.training.settings import check_val_fraction
from gpt2cli.training.sources import kind_of

EOS_TEXT = "<|endoftext|>"  # the tokenizer reads it as the one end-of-text id
# Tokenize in pieces of about this many characters, so a progress bar can move.
_CHUNK_CHARS = 1 << 20
_CACHE_VERSION = "1"

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def cache_dir() -> Path:
    """Where token ids are cached: $GPT2_CACHE_DIR, else the user's XDG cache folder."""
    if os.environ.get("GPT2_CACHE_DIR"):
        return Path(os.environ["GPT2_CACHE_DIR"]) / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2cli" / "tokens"


def resolve_files(patterns: Iterable[str], data_dir: str | None = None) -> list[Path]:
    """Expand names and globs; relative names are looked up under `data_dir` (DATA_DIR)."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if data_dir and not os.path.isabs(expanded):
            expanded = os.path.join(data_dir, expanded)
        matches = sorted(glob.glob(expanded, recursive=True))
        where = f" (DATA_DIR={data_dir})" if data_dir and not os.path.isabs(pattern) else ""
        if not matches:
            raise UserError(f"dataset {pattern!r} matches no file{where}")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                raise UserError(
                    f"dataset {path} is a folder; give text files or a glob like {path}/*.txt"
                )
            if path not in files:
                files.append(path)
    return files


def decode_text(raw: bytes, path: Path, errors: str = "strict") -> str:
    """UTF-8 text of a file; a bad byte is named with its offset unless errors='replace'."""
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"dataset {path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} "
            f"(convert it, or pass --errors replace)"
        ) from None


def text_chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """Split text into pieces that tokenize exactly as the whole text does.

    GPT-2's pre-tokenizer never joins a newline that sits between two non-space characters
    with its neighbours, so cutting just after such a newline changes no token.
    """
    chunks, start = [], 0
    while len(text) - start > size:
        cut = _safe_cut(text, start + size)
        if cut is None:
            break
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def _safe_cut(text: str, near: int) -> int | None:
    at = near
    while True:
        at = text.find("\n", at)
        if at < 0 or at + 1 >= len(text):
            return None
        if at > 0 and not text[at - 1].isspace() and not text[at + 1].isspace():
            return at + 1
        at += 1


def tokenizer_fingerprint(tokenizer: GPT2Tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()[:16]


def tokenize_file(
    path: Path,
    tokenizer: GPT2Tokenizer,
    *,
    errors: str = "strict",
    fingerprint: str | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Token ids (uint32) of one text file, from the cache when its content was seen before."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read dataset {path}: {exc.strerror}") from None
    if not raw.strip():
        raise UserError(f"dataset {path} is empty")
    fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
    key = hashlib.sha256(raw).hexdigest()
    kind = "-rows" if kind_of(path) == "jsonl" else ""
    cached = cache_dir() / f"{key[:32]}-{fingerprint}-{errors}{kind}-v{_CACHE_VERSION}.npy"
    if cached.is_file():
        try:
            ids = np.load(cached, allow_pickle=False)
            if progress:
                progress(len(raw), len(raw))
            return ids
        except (OSError, ValueError):
            pass  # a damaged cache entry: tokenize again and rewrite it
    text = decode_text(raw, path, errors)
    if kind_of(path) == "jsonl":  # text rows: the documents, joined as files are
        from gpt2cli.training.examples import text_rows

        text = EOS_TEXT.join(text_rows(path))
    ids, done = [], 0
    for chunk in text_chunks(text):
        ids.extend(tokenizer.encode(chunk))
        done += len(chunk.encode("utf-8", errors="surrogatepass"))
        if progress:
            progress(min(done, len(raw)), len(raw))
    array = np.asarray(ids, dtype=np.uint32)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, lambda tmp: _save_npy(tmp, array))
    except (OSError, UserError):
        pass  # the cache is an optimisation; an unwritable cache folder is not an error
    return array


def _save_npy(tmp: Path, array: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, array)


def load_tokens(
    files: list[Path],
    tokenizer: GPT2Tokenizer,
    *,
    errors: str = "strict",
    progress: Progress | None = None,
) -> np.ndarray:
    """All files' ids as one stream, documents joined with <|endoftext|>."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    sizes = [p.stat().st_size for p in files]
    total, before = sum(sizes), 0
    parts = []
    for i, (path, size) in enumerate(zip(files, sizes, strict=True)):

        def report(done: int, _: int, before: int = before) -> None:
            if progress:
                progress(before + done, total)

        if i:
            parts.append(np.asarray([tokenizer.eos_id], np.uint32))
        parts.append(
            tokenize_file(path, tokenizer, errors=errors, fingerprint=fingerprint, progress=report)
        )
        before += size
    return np.concatenate(parts)


@dataclass(frozen=True)
class Blocks:
    """A token stream seen as consecutive blocks of seq+1 tokens (inputs and shifted targets).

    Block i covers tokens [i*seq, i*seq + seq + 1): neighbours share one token, so every token
    but the first is a target exactly once per epoch.
    """

    tokens: np.ndarray
    seq: int

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq)

    def block(self, i: int) -> np.ndarray:
        return self.tokens[i * self.seq : i * self.seq + self.seq + 1]

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """[N] block indices -> [N, seq+1] int32 tokens."""
        return np.stack([self.block(int(i)) for i in indices]).astype(np.int32)


def split(tokens: np.ndarray, seq: int, val_fraction: float) -> tuple[Blocks, Blocks | None]:
    """Train blocks from the head of the stream, validation blocks from its tail."""
    check_val_fraction(val_fraction)
    need = seq + 1
    if len(tokens) < need:
        raise UserError(
            f"the dataset has {len(tokens)} tokens, shorter than one block "
            f"(--seq-length {seq} needs {need}); use more text or a smaller --seq-length"
        )
    n_val = int(len(tokens) * val_fraction)
    if n_val < need:  # too little for one validation block: train on everything
        return Blocks(tokens, seq), None
    train_tokens = tokens[: len(tokens) - n_val]
    if len(train_tokens) < need:
        raise UserError(
            f"after holding out --val-fraction {val_fraction}, {len(train_tokens)} training tokens "
            f"are left, shorter than one block of {need}; lower --val-fraction"
        )
    return Blocks(train_tokens, seq), Blocks(tokens[len(tokens) - n_val :], seq)


@dataclass(frozen=True)
class Sampler:
    """Which blocks form each step's batch: epochs of seeded permutations, read in order.

    Sample k of the run (k = step * rows_per_step + row) is block perm(epoch)[k % n] with
    epoch = k // n, so the batch of any step is known without replaying earlier ones.
    """

    n_blocks: int
    seed: int

    def permutation(self, epoch: int) -> np.ndarray:
        return _permutation(self.seed, epoch, self.n_blocks)

    def indices(self, start: int, count: int) -> np.ndarray:
        """Block indices of samples start .. start+count-1."""
        out = np.empty(count, np.int64)
        k = start
        while k < start + count:
            epoch, pos = divmod(k, self.n_blocks)
            take = min(self.n_blocks - pos, start + count - k)
            out[k - start : k - start + take] = self.permutation(epoch)[pos : pos + take]
            k += take
        return out


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n_blocks: int) -> np.ndarray:
    """One epoch's block order, computed once (int32: 4 bytes a block of a large corpus)."""
    dtype = np.int32 if n_blocks < 2**31 else np.int64
    order = np.random.default_rng([seed, epoch]).permutation(np.arange(n_blocks, dtype=dtype))
    order.flags.writeable = False
    return order


Part = tuple[int, int]  # (this process's index, number of processes): whose rows to read


def rows_of(idx: np.ndarray, part: Part) -> np.ndarray:
    """The columns of [..., rows] block indices that process part[0] of part[1] reads."""
    index, count = part
    size = idx.shape[-1] // count
    return idx[..., index * size : (index + 1) * size]


def batch_for_step(
    blocks: Blocks, sampler: Sampler, step: int, rows: int, accum: int, part: Part = (0, 1)
) -> np.ndarray:
    """The [accum, rows/count, seq+1] tokens of optimizer step `step` (0-based) that `part`
    reads; only those blocks are read (from a memory-mapped corpus, only those pages)."""
    per_step = rows * accum
    idx = rows_of(sampler.indices(step * per_step, per_step).reshape(accum, rows), part)
    return blocks.gather(idx.reshape(-1)).reshape(*idx.shape, blocks.seq + 1)


def val_batches(
    blocks: Blocks, rows: int, max_batches: int, part: Part = (0, 1)
) -> list[np.ndarray]:
    """Fixed validation batches ([rows/count, seq+1] each), the same at every evaluation."""
    n = min(len(blocks) // rows, max_batches)
    if n == 0:  # fewer blocks than a batch: repeat them to fill one
        return [blocks.gather(rows_of(np.resize(np.arange(len(blocks)), rows), part))]
    return [blocks.gather(rows_of(np.arange(b * rows, (b + 1) * rows), part)) for b in range(n)]
