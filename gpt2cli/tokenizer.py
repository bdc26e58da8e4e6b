"""GPT-2 byte-level BPE: the bundled OpenAI files, or another HF folder's tokenizer, and the
streaming detokenizer that turns ids into text one token at a time."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from functools import lru_cache
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

    def encode_unlocked(self, text: str) -> list[int]:
        """`encode`, letting other Python threads run meanwhile: tokenizers' batch call releases
        the GIL, its single call does not (a 1 MiB text holds it for a second). For the server;
        a process that forks after using it gets a warning from tokenizers."""
        return self.backend.encode_batch([text], add_special_tokens=False)[0].ids

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

    byte_of = _unicode_to_bytes()
    vocab = json.loads(vocab_json)
    ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items() if token != EOS_TEXT}
    return tiktoken.Encoding(
        "gpt2-bundled",
        pat_str=_GPT2_SPLIT,
        mergeable_ranks=ranks,
        special_tokens={EOS_TEXT: vocab[EOS_TEXT]},
    )


@lru_cache(maxsize=1)
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


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in _bytes_to_unicode().items()}


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


def hf_files(tokenizer: GPT2Tokenizer, context: int) -> dict[str, str]:
    """File name -> text of the tokenizer files and generation_config.json a Hugging Face
    folder carries, so that transformers' `AutoTokenizer` and `pipeline` load it (no network:
    written from the tokenizer itself). `context`: the model's window (`model_max_length`)."""
    import json
    import tempfile

    backend = tokenizer.backend
    with tempfile.TemporaryDirectory() as tmp:
        backend.model.save(tmp)  # a BPE model writes vocab.json and merges.txt
        saved = [Path(tmp) / name for name in ("vocab.json", "merges.txt")]
        files = {f.name: f.read_text("utf-8") for f in saved if f.is_file()}
    files["tokenizer.json"] = backend.to_str(pretty=True)
    eos = EOS_TEXT if tokenizer.eos_id is not None else None
    special = {"bos_token": eos, "eos_token": eos, "unk_token": eos} if eos else {}
    added = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                 "normalized": t.normalized, "single_word": t.single_word, "special": t.special}
        for i, t in backend.get_added_tokens_decoder().items()
    }  # fmt: skip
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": context,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        **special,
    }
    ids = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id} if eos else {}
    files["tokenizer_config.json"] = json.dumps(config, indent=2) + "\n"
    files["special_tokens_map.json"] = json.dumps(special, indent=2) + "\n"
    files["generation_config.json"] = json.dumps(ids, indent=2) + "\n"  # where text ends
    return files


@lru_cache(maxsize=4)
def token_bytes(tokenizer: GPT2Tokenizer) -> tuple[bytes, ...]:
    """The raw bytes of every token id (special tokens, and tokens outside GPT-2's byte
    alphabet, as the UTF-8 of their decoded text)."""
    alphabet = _unicode_to_bytes()
    backend = tokenizer.backend
    special = {t.content for t in backend.get_added_tokens_decoder().values()}
    table = []
    for token_id in range(backend.get_vocab_size()):
        piece = backend.id_to_token(token_id) or ""
        if piece in special or any(ch not in alphabet for ch in piece):
            table.append(backend.decode([token_id], skip_special_tokens=False).encode())
        else:
            table.append(bytes(alphabet[ch] for ch in piece))
    return tuple(table)


class StreamingDetokenizer:
    """Token ids -> text, one token at a time, never splitting a multi-byte UTF-8 character.

    Byte-level BPE can cut an emoji or a CJK character across tokens, and decoding each token
    alone would print U+FFFD. Each token becomes its raw bytes, fed to an incremental UTF-8
    decoder that holds an incomplete character back until its last byte arrives. `add` returns
    the text a token completes; `finish` flushes the rest.
    """

    def __init__(self, tokenizer: GPT2Tokenizer):
        self._bytes = token_bytes(tokenizer)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        piece = self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""
        return self._decoder.decode(piece)

    def finish(self) -> str:
        """Whatever is still held (a truncated character becomes U+FFFD, like `decode`)."""
        return self._decoder.decode(b"", final=True)
