"""Token ids -> text, one token at a time, never splitting a multi-byte UTF-8 character.

GPT-2's byte-level BPE can cut an emoji or a CJK character across tokens; decoding each token
alone would print U+FFFD. We turn each token into its raw bytes and feed them to an incremental
UTF-8 decoder, which holds an incomplete character back until its last byte arrives.
"""

from __future__ import annotations

import codecs
from functools import lru_cache

from gpt2cli.tokenizer import GPT2Tokenizer


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


@lru_cache(maxsize=4)
def token_bytes(tokenizer: GPT2Tokenizer) -> tuple[bytes, ...]:
    """The raw bytes of every token id (special tokens as their UTF-8 text)."""
    alphabet = _unicode_to_byte()
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
    """Feed token ids with `add`, get back the text they complete; `finish` flushes the rest."""

    def __init__(self, tokenizer: GPT2Tokenizer):
        self._bytes = token_bytes(tokenizer)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        piece = self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""
        return self._decoder.decode(piece)

    def finish(self) -> str:
        """Whatever is still held (a truncated character becomes U+FFFD, like `decode`)."""
        return self._decoder.decode(b"", final=True)
