"""GPT-2 byte-level BPE: the bundled OpenAI files, or another HF folder's tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from gpt2cli.errors import UserError

EOS_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class GPT2Tokenizer:
    """Text <-> token ids. `<|endoftext|>` in text is the single special id `eos_id`."""

    backend: Tokenizer

    @property
    def eos_id(self) -> int:
        return self.backend.token_to_id(EOS_TEXT)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def bundled_files():
    """(vocab.json, merges.txt) text of the bundled OpenAI GPT-2 tokenizer."""
    assets = resources.files("gpt2cli") / "assets"
    return (assets / "vocab.json").read_text("utf-8"), (assets / "merges.txt").read_text("utf-8")


# GPT-2's pre-tokenizer split, as OpenAI's encoder.py and tokenizers' ByteLevel spell it.
_GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def fast_encoder(vocab_json: str):
    """A tiktoken Encoding of a byte-level BPE vocabulary (GPT-2's ids, several times faster).

    GPT-2's ids are its merge ranks (the 256 byte tokens first, then one id per merge in
    order), so the vocabulary alone gives tiktoken its ranks: no download, no merges file.
    `encode(text, allowed_special="all")` equals `GPT2Tokenizer.encode(text)`; tests prove it.
    """
    import json

    import tiktoken

    byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab = json.loads(vocab_json)
    ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items() if token != EOS_TEXT}
    return tiktoken.Encoding(
        "gpt2-bundled",
        pat_str=_GPT2_SPLIT,
        mergeable_ranks=ranks,
        special_tokens={EOS_TEXT: vocab[EOS_TEXT]},
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (OpenAI's encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def from_bpe_files(vocab: Path, merges: Path) -> GPT2Tokenizer:
    backend = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(EOS_TEXT, special=True)])
    return GPT2Tokenizer(backend)


def bundled() -> GPT2Tokenizer:
    """The OpenAI GPT-2 vocabulary shipped inside the package (works offline)."""
    assets = resources.files("gpt2cli") / "assets"
    with (
        resources.as_file(assets / "vocab.json") as vocab,
        resources.as_file(assets / "merges.txt") as merges,
    ):
        return from_bpe_files(vocab, merges)


def from_folder(folder: Path) -> GPT2Tokenizer | None:
    """The tokenizer files of a HF folder, or None when it has none."""
    if (folder / "tokenizer.json").is_file():
        try:
            return GPT2Tokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")))
        except Exception as exc:  # tokenizers raises bare Exception on bad files
            raise UserError(f"cannot read {folder / 'tokenizer.json'}: {exc}") from exc
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        try:
            return from_bpe_files(folder / "vocab.json", folder / "merges.txt")
        except Exception as exc:
            raise UserError(f"cannot read the tokenizer files in {folder}: {exc}") from exc
    return None
