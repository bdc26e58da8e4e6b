"""The bundled tokenizer is OpenAI's GPT-2 BPE: known ids from ../shared/gpt2-tokenizer/SOURCE.md."""

import hashlib
from importlib import resources

from gpt2cli.tokenizer import bundled, from_folder
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
