"""The bundled tokenizer is OpenAI's GPT-2 BPE: known ids from ../shared/gpt2-tokenizer/SOURCE.md."""

import hashlib
from importlib import resources

from gpt2cli.tokenizer import StreamingDetokenizer, bundled, from_folder, token_bytes
from tests.conftest import TINY_A

SHA256 = {
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def test_bundled_files_are_byte_exact_openai_gpt2():
    assets = resources.files("gpt2cli") / "assets"
    for name, digest in SHA256.items():
        assert hashlib.sha256((assets / name).read_bytes()).hexdigest() == digest


def test_known_token_ids():
    tokenizer = bundled()
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert tokenizer.eos_id == 50256 and tokenizer.vocab_size == 50257


def test_round_trip_of_unicode_text():
    tokenizer = bundled()
    text = " Grüße, 世界 🤗<|endoftext|>next"
    ids = tokenizer.encode(text)
    assert 50256 in ids
    assert tokenizer.decode(ids) == text


def test_golden_prompt_ids_match_transformers_tokenization(golden):
    tokenizer = bundled()
    prompt = golden["models"]["tiny_a"]["generate"]["prompts"][0]
    assert (
        tokenizer.encode(prompt["prompt_text"])
        == golden["arrays"]["tiny_a/gen0/prompt_ids"].tolist()
    )


def test_folder_tokenizer_files_are_used():
    assert from_folder(TINY_A).encode("Hello world") == [15496, 995]


# emoji, CJK and accents: characters that byte-level BPE splits across tokens
SPLIT_TEXT = " Café 🎉 東京タワー 👍🏽 naïve — ok"


def test_detokenizer_streams_whole_characters_only():
    tok = bundled()
    detok = StreamingDetokenizer(tok)
    pieces = [detok.add(i) for i in tok.encode(SPLIT_TEXT)] + [detok.finish()]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == SPLIT_TEXT


def test_detokenizer_flushes_a_truncated_character_like_decode():
    tok = bundled()
    ids = tok.encode("🎉")
    detok = StreamingDetokenizer(tok)
    text = "".join(detok.add(i) for i in ids[:-1]) + detok.finish()
    assert text == tok.decode(ids[:-1])


def test_token_bytes_are_the_raw_bytes_of_each_token():
    tok = bundled()
    table = token_bytes(tok)
    assert b"".join(table[i] for i in tok.encode(SPLIT_TEXT)) == SPLIT_TEXT.encode()
    assert table[tok.eos_id] == b"<|endoftext|>"
