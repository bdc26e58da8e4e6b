"""The data pipeline: files, UTF-8, tokenizing with a cache, blocks, split, sampling."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2cli.errors import UserError
from gpt2cli.tokenizer import bundled
from gpt2cli.training import data


@pytest.fixture(scope="module")
def tok():
    return bundled()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "cache"))


def test_resolve_globs_and_data_dir(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "c.md").write_text("c")
    assert [p.name for p in data.resolve_files(["*.txt"], str(tmp_path))] == ["a.txt", "b.txt"]
    absolute = str(tmp_path / "c.md")
    assert data.resolve_files([absolute], "/nonexistent") == [tmp_path / "c.md"]


def test_glob_matching_nothing_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"'nope/\*.txt' matches no file \(DATA_DIR="):
        data.resolve_files(["nope/*.txt"], str(tmp_path))


def test_non_utf8_names_file_and_offset(tmp_path, tok):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello world\xff\xfe more")
    with pytest.raises(UserError, match=r"bad.txt is not UTF-8 text: byte 0xff at offset 11"):
        data.load_tokens([bad], tok)
    ids = data.load_tokens([bad], tok, errors="replace")
    assert "\ufffd" in tok.decode(ids.tolist())


def test_empty_file(tmp_path, tok):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="empty.txt is empty"):
        data.load_tokens([empty], tok)


def test_shorter_than_one_block():
    with pytest.raises(UserError, match="20 tokens, shorter than one block .* needs 65"):
        data.split(np.arange(20), 64, 0.0)


def test_chunked_tokenizing_equals_whole_text(tok):
    text = "a\n\n\nb c \nd\ne  \n f\n's\n" * 50 + "x\ny<|endoftext|>z\nw" * 30
    chunks = data.text_chunks(text, size=7)
    assert len(chunks) > 20 and "".join(chunks) == text
    assert sum((tok.encode(c) for c in chunks), []) == tok.encode(text)


def test_documents_joined_with_eos_and_cached(tmp_path, tok, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Hello world")
    b.write_text("Bye")
    ids = data.load_tokens([a, b], tok)
    assert ids.tolist() == [15496, 995, tok.eos_id, *tok.encode("Bye")]

    def no_encoding(_):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(type(tok), "encode", lambda self, text: no_encoding(text))
    assert data.load_tokens([a, b], tok).tolist() == ids.tolist()
    b.write_text("Changed")  # new content, new cache key
    with pytest.raises(AssertionError, match="tokenized again"):
        data.load_tokens([b], tok)


def test_blocks_overlap_by_one_token_and_split_holds_out_the_tail():
    tokens = np.arange(100)
    train, val = data.split(tokens, 8, 0.2)
    assert len(train) == (80 - 1) // 8 and len(val) == (20 - 1) // 8
    assert train.block(1).tolist() == list(range(8, 17))
    assert val.block(0)[0] == 80
    train_only, none = data.split(tokens, 8, 0.05)  # 5 tokens cannot make a block
    assert none is None and len(train_only.tokens) == 100


def test_sampler_is_a_pure_function_of_seed_and_step():
    blocks = data.Blocks(np.arange(1000), 9)  # 111 blocks
    sampler = data.Sampler(len(blocks), seed=3)
    first = data.batch_for_step(blocks, sampler, 5, rows=4, accum=2)
    assert first.shape == (2, 4, 10)
    again = data.batch_for_step(blocks, data.Sampler(len(blocks), 3), 5, rows=4, accum=2)
    assert np.array_equal(first, again)
    other = data.batch_for_step(blocks, data.Sampler(len(blocks), 4), 5, rows=4, accum=2)
    assert not np.array_equal(first, other)
    epoch = sampler.indices(0, len(blocks))
    assert sorted(epoch.tolist()) == list(range(len(blocks)))  # every block once per epoch
    across = sampler.indices(len(blocks) - 2, 4)  # crosses into epoch 1
    assert across[:2].tolist() == epoch[-2:].tolist()
    assert across[2:].tolist() == sampler.permutation(1)[:2].tolist()
