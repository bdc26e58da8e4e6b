"""`gpt2 prepare`: shards equal to the plain path's tokens, resumable, bounded, memory-mapped."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from gpt2cli.errors import UserError
from gpt2cli.tokenizer import bundled, bundled_files, fast_encoder
from gpt2cli.training import data, sources
from gpt2cli.training import prepare as prep
from gpt2cli.training.shards import TokenStream, open_prepared
from tests.conftest import run_gpt2

# gpt2 prepare's encoder; a GPU machine running the checkout may lack it
pytest.importorskip("tiktoken", reason="gpt2 prepare needs tiktoken (pip install tiktoken)")

ROOT = Path(__file__).parent.parent
TRICKY = (
    "héllo\u00a0 wörld  \n\n\t<|endoftext|>x 12345 🤖'll 'S \r\n  end \u3000日本語 \n"
    "don't  stop\n\n\n  x\ny\n a-b\n'll\n'S 2024-11-26  \t\n"
)


@pytest.fixture(scope="module")
def tok():
    return bundled()


@pytest.fixture(autouse=True)
def _small(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "PIECE_BYTES", 500)  # many pieces from small files


def _text(n: int, seed: int = 0) -> str:
    """Prose-like text with the spacing and unicode that tokenizers trip over."""
    rng = np.random.default_rng(seed)
    words = ["the", "Cat", "sat", "'s", "on", "a", "mat", "123", "x,y", "日本", "é", " ", "\n"]
    return TRICKY + "".join(f"{rng.choice(words)} " for _ in range(n)) + TRICKY


def _corpus(folder: Path) -> tuple[list[Path], list[str]]:
    """A text file, a gzipped text file and a gzipped JSON-lines file; and their documents."""
    folder.mkdir(exist_ok=True)
    a, b, c = folder / "a.txt", folder / "b.txt.gz", folder / "c.jsonl.gz"
    docs_a, docs_b = _text(900, 1), _text(700, 2)
    lines = [_text(40, 10 + i) for i in range(30)]
    a.write_text(docs_a, encoding="utf-8")
    b.write_bytes(gzip.compress(docs_b.encode()))
    c.write_bytes(gzip.compress("\n".join(json.dumps({"text": t}) for t in lines).encode()))
    return [a, b, c], [docs_a, docs_b, *lines]


def _expected(tok, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for i, doc in enumerate(docs):
        ids += ([tok.eos_id] if i else []) + tok.encode(doc)
    return ids


def test_fast_encoder_equals_the_tokenizer_on_every_test_file(tok):
    encoder = fast_encoder(bundled_files()[0])
    files = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("**/*.md"), *ROOT.glob("gpt2cli/**/*.py")]
    texts = [f.read_text("utf-8") for f in files] + [TRICKY, _text(3000)]
    assert len(texts) > 30
    for text in texts:
        assert encoder.encode(text, allowed_special="all") == tok.encode(text)


def test_safe_cuts_change_no_token(tok):
    text = _text(2000).encode()
    reader_pieces = []
    path = Path("x.txt")
    cuts = [m.end() for m in sources._SAFE_CUT.finditer(text)]
    assert len(cuts) > 100
    start = 0
    for cut in cuts[::7] + [len(text)]:
        reader_pieces.append(text[start:cut].decode())
        start = cut
    assert sum((tok.encode(p) for p in reader_pieces), []) == tok.encode(text.decode()), path


def test_prepared_tokens_equal_the_plain_path(tmp_path, tok):
    files, docs = _corpus(tmp_path / "in")
    result = prep.prepare(files, tmp_path / "out", prep.PrepareSettings(shard_tokens=700))
    index = result.index
    assert index["documents"] == len(docs) and len(index["shards"]) > 3
    got = np.asarray(open_prepared(tmp_path / "out").tokens)
    assert got.dtype == np.uint16
    assert got.tolist() == _expected(tok, docs)
    plain = data.load_tokens(files[:1], tok)  # a text file: the same ids as gpt2 train reads
    assert got[: len(plain)].tolist() == plain.tolist()
    assert [s["documents"] for s in index["sources"]] == [1, 1, 30]
    assert sum(s["tokens"] for s in index["sources"]) == index["tokens"] == len(got)
    raw = files[1].read_bytes()
    import hashlib

    assert index["sources"][1]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert index["split"]["val_start"] == len(got) - int(len(got) * 0.05)


def test_rerun_finishes_only_what_is_missing(tmp_path, tok, monkeypatch):
    files, docs = _corpus(tmp_path / "in")
    settings = prep.PrepareSettings(shard_tokens=700)
    close = prep._ShardWriter.close
    calls = []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return close(self)

    monkeypatch.setattr(prep._ShardWriter, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(files, tmp_path / "out", settings, workers=1)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [prep.PROGRESS, "shard-00000.bin", "shard-00001.bin"]  # no half shard
    monkeypatch.setattr(prep._ShardWriter, "close", close)
    again = prep.prepare(files, tmp_path / "out", settings, workers=2)
    kept = again.index["shards"][:2]  # a shard closes at the first piece boundary past 700
    assert again.resumed_at == sum(s["tokens"] for s in kept) >= 1400
    assert np.asarray(open_prepared(tmp_path / "out").tokens).tolist() == _expected(tok, docs)
    assert not (tmp_path / "out" / prep.PROGRESS).exists()
    done = prep.prepare(files, tmp_path / "out", settings)
    assert done.resumed_at is None and done.index == again.index
    with pytest.raises(UserError, match="other inputs or settings"):
        prep.prepare(files[:1], tmp_path / "out", settings)


def test_bad_json_line_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 3 has no field 'text'"):
        prep.prepare([bad], tmp_path / "out", workers=1)
    assert not list((tmp_path / "out").glob("*shard*"))
    with pytest.raises(UserError, match=r"bad.jsonl line 1 is not JSON"):
        bad.write_text("nope\n")
        prep.prepare([bad], tmp_path / "out2", workers=1)


def test_token_stream_views_cross_shards():
    shards = [np.arange(0, 5, dtype=np.uint16), np.arange(5, 7, dtype=np.uint16)]
    shards.append(np.arange(7, 20, dtype=np.uint16))
    stream = TokenStream(shards)
    assert len(stream) == 20
    view = stream[3:18][1:10]
    assert np.asarray(view).tolist() == list(range(4, 13))
    blocks = data.Blocks(stream[2:], 4)
    assert blocks.gather(np.array([3, 0])).tolist() == [list(range(14, 19)), list(range(2, 7))]


def test_each_process_reads_only_its_rows():
    tokens = np.arange(2000)
    blocks, sampler = data.Blocks(tokens, 9), data.Sampler(222, seed=1)
    whole = data.batch_for_step(blocks, sampler, 3, rows=4, accum=2)
    halves = [data.batch_for_step(blocks, sampler, 3, 4, 2, part=(i, 2)) for i in range(2)]
    assert np.array_equal(np.concatenate(halves, axis=1), whole)
    val = [data.val_batches(blocks, 4, 2, part=(1, 2))[0], data.val_batches(blocks, 4, 2)[0]]
    assert np.array_equal(val[0], val[1][2:])


def test_prepared_and_plain_runs_get_the_same_batches(tmp_path, tok):
    from gpt2cli.config import preset
    from gpt2cli.training.plan import load_data, new_plan
    from gpt2cli.training.settings import Settings

    text = tmp_path / "corpus.txt"
    text.write_text(_text(3000), encoding="utf-8")
    prep.prepare([text], tmp_path / "prepared", prep.PrepareSettings(shard_tokens=900))
    loaded = []
    for dataset in ([str(text)], [str(tmp_path / "prepared")]):
        request = Settings.from_flat(
            {"dataset": dataset, "init": "tiny", "output": str(tmp_path / f"{len(loaded)}.npz"),
             "eval_batches": 4, "steps": 10, "batch_size": 4, "seq_length": 32, "seed": 7}
        )  # fmt: skip
        plan = new_plan(request, preset("tiny"), force=False, main_process=True)
        loaded.append(load_data(plan, tok))
    plain, prepared = loaded
    assert len(plain.train) == len(prepared.train) > 30
    for step in (0, 1, 9, 50):
        assert np.array_equal(plain.batch(step), prepared.batch(step))
    val = plain.validation(), prepared.validation()
    assert len(val[0]) == len(val[1]) == 2
    assert all(np.array_equal(a, b) for a, b in zip(*val, strict=True))


def test_cli_prepare_reports_and_refuses_bad_flags(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(_text(200))
    done = run_gpt2("prepare", str(corpus), "--out", str(tmp_path / "p"), "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert "prepared:" in done.stderr and "1 document in 1 shard" in done.stderr
    again = run_gpt2("prepare", str(corpus), "--out", str(tmp_path / "p"))
    assert again.returncode == 0 and "already prepared" in again.stderr
    other = run_gpt2("prepare", str(corpus), "--out", str(tmp_path / "p"), "--val-fraction", "0.1")
    assert other.returncode == 1 and "--force" in other.stderr
    bad = run_gpt2("prepare", str(corpus), "--out", str(tmp_path / "q"), "--workers", "0")
    assert bad.returncode == 2  # a usage error: Typer checks the range
    assert "Invalid value for '--workers' / '-j'" in bad.stderr


def test_eval_scores_the_prepared_validation_split(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(_text(600))
    folder = tmp_path / "p"
    prep.prepare([corpus], folder, prep.PrepareSettings(val_fraction=0.2), workers=1)
    val = len(open_prepared(folder).validation())
    done = run_gpt2("eval", "-m", str(ROOT / "tests/fixtures/tiny-a"), "-d", str(folder), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # a window's first token is context, not scored
    assert result["tokens_scored"] == val - result["windows"] > 100


@pytest.mark.slow
def test_ctrl_c_keeps_whole_shards_and_the_same_command_finishes(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import gpt2_exe

    corpus = tmp_path / "big.txt"
    base = _text(4000, 3)
    corpus.write_text(
        "".join(f"Part {i}. {base}" for i in range(400))
    )  # 6 MB, 1 MB pieces: 7 shards
    command = [gpt2_exe(), "prepare", str(corpus), "--out", str(tmp_path / "p"),
               "--shard-tokens", "20000", "--workers", "1"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "p").glob("shard-00001.bin")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "run the same command to go on" in stderr
    left = sorted(os.listdir(tmp_path / "p"))
    assert prep.INDEX not in left and not [n for n in left if n.endswith(".tmp")], left
    kept = [n for n in left if n.startswith("shard-")]
    done = run_gpt2(*command[1:])
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / "p" / prep.INDEX).read_text())
    assert len(index["shards"]) > len(kept) >= 2
    whole = prep.prepare([corpus], tmp_path / "q", prep.PrepareSettings(shard_tokens=20000))
    assert index["tokens"] == whole.index["tokens"]  # (ids equal the tokenizer's: tests above)
    tokens = [np.asarray(open_prepared(tmp_path / f).tokens) for f in ("p", "q")]
    assert np.array_equal(*tokens)
