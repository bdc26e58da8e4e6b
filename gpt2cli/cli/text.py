"""Text from the user (argv, stdin, lines of a chat) is UTF-8, or one clear line says where not."""

from __future__ import annotations

from gpt2cli.errors import UserError


def decode(data: bytes, where: str, then: str = "") -> str:
    """`data` as UTF-8 text; a UserError naming `where` and the first bad byte otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(_not_utf8(where, data[exc.start], exc.start) + then) from None


def check(text: str, where: str, then: str = "") -> str:
    """Text that Python decoded with surrogate escapes (argv under LC_ALL=C) is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = text[exc.start].encode("utf-8", "surrogateescape")
        raise UserError(_not_utf8(where, raw[0], exc.start) + then) from None
    return text


def _not_utf8(where: str, byte: int, offset: int) -> str:
    return f"{where} is not UTF-8 text: byte 0x{byte:02x} at offset {offset}"
