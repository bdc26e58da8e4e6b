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
from tests.conftest import cli, run_gpt2

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


# ---- input that breaks the reader's promise (issue 24) -------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"text": "a", "n": ' + "9" * 5000 + "}", "more than 4300 digits"),
        ('{"text": "a \\ud800 b"}', "lone surrogate"),
    ],
)
def test_a_json_line_python_cannot_read_is_named(tmp_path, line, reason):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"bad.jsonl line 2 .*{reason}"):
        prep.prepare([bad], tmp_path / "out", workers=1)


def test_replace_turns_a_lone_surrogate_into_the_replacement_character(tmp_path, tok):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a \\ud800 b"}\n')
    settings = prep.PrepareSettings(errors="replace", val_fraction=0.0)
    prep.prepare([path], tmp_path / "out", settings, workers=1)
    assert np.asarray(open_prepared(tmp_path / "out").tokens).tolist() == tok.encode("a \ufffd b")


def test_a_failed_prepare_removes_the_folders_it_made_and_only_those(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    with pytest.raises(UserError, match="line 1 is not JSON"):
        prep.prepare([bad], tmp_path / "new" / "out", workers=1)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="line 1 is not JSON"):
        prep.prepare([bad], tmp_path / "mine", workers=1)
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    with pytest.raises(UserError, match=r"cannot make the folder /proc/foo: "):
        prep.prepare([corpus], Path("/proc/foo"), workers=1)


# ---- prepared folders that are not what their index says (issue 24) ------------------------


SMALL_SHARDS = prep.PrepareSettings(shard_tokens=700)


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory):
    """(input files, prepared folder, its index) made once: tests change copies of the folder."""
    folder = tmp_path_factory.mktemp("prepared")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "PIECE_BYTES", 500)
        files, _ = _corpus(folder / "in")
        index = prep.prepare(files, folder / "out", SMALL_SHARDS, workers=1).index
    return files, folder / "out", index


def _prepared(tmp_path, prepared_once):
    """A copy of the prepared folder under tmp_path/out: (input files, settings, its index)."""
    import copy
    import shutil

    files, folder, index = prepared_once
    shutil.copytree(folder, tmp_path / "out")
    return files, SMALL_SHARDS, copy.deepcopy(index)


def _damage_shard(path: Path) -> None:
    ids = np.fromfile(path, np.uint16)
    ids[3] = (int(ids[3]) + 1) % 50257  # the right size, one other id in the vocabulary
    ids.tofile(path)


@pytest.mark.parametrize(
    ("harm", "said"),
    [
        (lambda p: p.unlink(), "shard-00001.bin is missing"),
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), "shard-00001.bin has"),
        (_damage_shard, "shard-00001.bin does not match the sha256"),
    ],
)
def test_prepare_rebuilds_a_shard_that_was_deleted_truncated_or_changed(
    tmp_path, prepared_once, harm, said
):
    files, settings, index = _prepared(tmp_path, prepared_once)
    before = np.asarray(open_prepared(tmp_path / "out").tokens)
    first = (tmp_path / "out" / "shard-00000.bin").stat().st_ino
    harm(tmp_path / "out" / "shard-00001.bin")
    again = prep.prepare(files, tmp_path / "out", settings, workers=1)
    assert said in again.repaired
    assert again.resumed_at == index["shards"][0]["tokens"]  # shard 0 kept, the rest made again
    assert (tmp_path / "out" / "shard-00000.bin").stat().st_ino == first
    assert again.index == index
    assert np.array_equal(np.asarray(open_prepared(tmp_path / "out").tokens), before)
    assert prep.prepare(files, tmp_path / "out", settings).resumed_at is None


def test_an_index_without_shard_checksums_still_reads_and_ids_beyond_the_vocabulary_are_caught(
    tmp_path, prepared_once
):
    files, settings, index = _prepared(tmp_path, prepared_once)
    for shard in index["shards"]:
        del shard["sha256"], shard["after"]  # as gpt2 wrote it before it kept them
    (tmp_path / "out" / prep.INDEX).write_text(json.dumps(index))
    assert prep.prepare(files, tmp_path / "out", settings).resumed_at is None
    shard = tmp_path / "out" / "shard-00002.bin"
    ids = np.fromfile(shard, np.uint16)
    ids[5] = 60000
    ids.tofile(shard)
    stream = open_prepared(tmp_path / "out").tokens
    with pytest.raises(UserError, match=r"shard-00002.bin has token id 60000 at token 5 but"):
        np.asarray(stream)
    blocks = data.Blocks(stream, 16)
    first = index["shards"][0]["tokens"] + index["shards"][1]["tokens"]
    blocks.gather(np.array([0, 1]))  # the blocks before the damage read as before
    with pytest.raises(UserError, match="run the same gpt2 prepare again"):
        blocks.gather(np.array([first // 16]))
    again = prep.prepare(files, tmp_path / "out", settings, workers=1)
    assert "has token id 60000" in again.repaired
    assert again.resumed_at == 0  # without "after", where shard 2 began is not known
    assert int(np.asarray(open_prepared(tmp_path / "out").tokens).max()) < 50257


def test_the_cli_says_it_prepared_a_damaged_folder_again(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(_text(200))
    command = ("prepare", str(corpus), "--out", str(tmp_path / "p"), "--workers", "1")
    assert cli(*command).exit_code == 0
    (tmp_path / "p" / "shard-00000.bin").unlink()
    again = cli(*command)
    assert again.exit_code == 0, again.stderr
    assert "shard-00000.bin is missing: prepared again" in again.stderr
    assert "already prepared" not in again.stderr


def _edit(index: dict, change) -> dict:
    change(index)
    return index


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda i: i.update(tokens=5), r"index.json: tokens is 5 but its shards hold \d+"),
        (lambda i: i["shards"].pop(), "index.json: tokens is .* but its shards hold"),
        (lambda i: i["split"].update(val_start=-5), "index.json: split.val_start is -5"),
        (
            lambda i: i["shards"][0].update(file="../other/shard.bin"),
            r"index.json: shards\[0\].file '../other/shard.bin' is not a file name in",
        ),
        (lambda i: i.pop("shards"), "index.json: shards is missing"),
        (lambda i: i.pop("split"), "index.json: split is missing"),
        (lambda i: i.pop("tokenizer"), "index.json: tokenizer is missing"),
        (lambda i: i.update(sources=5), "index.json: sources must be a list, got 5"),
        (
            lambda i: i["split"].update(val_fraction="x"),
            "index.json: split.val_fraction must be a finite number, got 'x'",
        ),
        (lambda i: i["shards"][0].pop("tokens"), r"index.json: shards\[0\].tokens is missing"),
    ],
)
def test_an_index_that_disagrees_with_itself_or_its_folder_names_the_field(
    tmp_path, prepared_once, change, said
):
    _, _, index = _prepared(tmp_path, prepared_once)
    (tmp_path / "out" / prep.INDEX).write_text(json.dumps(_edit(index, change)))
    with pytest.raises(UserError, match=said + ".*: prepare the dataset again$"):
        open_prepared(tmp_path / "out")


def test_a_shard_file_the_index_leaves_out_is_named(tmp_path, prepared_once):
    _, _, index = _prepared(tmp_path, prepared_once)
    last = index["shards"].pop()
    index["tokens"] -= last["tokens"]
    index["sources"][-1]["tokens"] -= last["tokens"]
    index["split"]["val_start"] = index["tokens"] - int(index["tokens"] * 0.05)
    (tmp_path / "out" / prep.INDEX).write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"shards does not list {last['file']}, which is in"):
        open_prepared(tmp_path / "out")


# ---- text without spaces (issue 24) -------------------------------------------------------


def _cjk(chars: int, mark_every: int | None, seed: int = 0) -> str:
    """Chinese-like text: ideographs, a 。 or 、 every `mark_every` characters (or none)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0x4E00, 0x9FA5, chars)
    if mark_every:
        marks = rng.random(chars) < 1 / mark_every
        codes[marks] = rng.choice([0x3002, 0x3001], int(marks.sum()))
    return "".join(map(chr, codes.tolist()))


def _pieces(path: Path) -> list[bytes]:
    with sources.SourceReader(path) as reader:
        return [piece.data for piece in reader.pieces()]


def test_text_without_spaces_is_cut_after_a_word_and_tokenizes_as_a_whole(tmp_path, tok):
    text = _cjk(3000, 20) + "<|endoftext|>" + _cjk(1000, 20, 1)
    path = tmp_path / "zh.txt"
    path.write_text(text, encoding="utf-8")
    pieces = _pieces(path)
    assert len(pieces) > 10 and max(map(len, pieces)) < 3 * sources.PIECE_BYTES
    assert all(p.decode()[-1] not in "。、" and p.decode()[0] in "。、" for p in pieces[1:-1])
    prep.prepare([path], tmp_path / "out", workers=1)
    assert np.asarray(open_prepared(tmp_path / "out").tokens).tolist() == tok.encode(text)


def test_text_without_any_break_is_cut_at_a_character_to_bound_memory(tmp_path, tok):
    text = _cjk(3000, None)
    path = tmp_path / "zh.txt"
    path.write_text(text, encoding="utf-8")
    pieces = _pieces(path)
    assert len(pieces) > 5 and max(map(len, pieces)) < 3 * sources.PIECE_BYTES
    assert "".join(p.decode() for p in pieces) == text  # every cut on a character boundary
    ids = sum((tok.encode(p.decode()) for p in pieces), [])
    assert tok.decode(ids) == text  # the same text; a token may be split in two at a cut
    assert abs(len(ids) - len(tok.encode(text))) <= len(pieces)


def test_the_fingerprint_covers_the_tokens_and_is_unchanged_for_an_old_index(
    tmp_path, prepared_once
):
    import hashlib

    _, _, index = _prepared(tmp_path, prepared_once)
    assert (
        open_prepared(tmp_path / "out").fingerprint == open_prepared(prepared_once[1]).fingerprint
    )
    _damage_shard(tmp_path / "out" / "shard-00002.bin")
    with pytest.raises(UserError, match="shard-00002.bin does not match the sha256 its index"):
        open_prepared(tmp_path / "out").fingerprint  # noqa: B018 - reading it checks the shards
    for shard in index["shards"]:
        del shard["sha256"], shard["after"]
    (tmp_path / "out" / prep.INDEX).write_text(json.dumps(index))
    before = [index["tokenizer"]["fingerprint"], *(s["sha256"] for s in index["sources"])]
    legacy = hashlib.sha256("\n".join(before).encode()).hexdigest()[:16]
    assert open_prepared(tmp_path / "out").fingerprint == legacy  # its runs still resume


def test_the_tokenizer_gets_bounded_runs_cut_where_no_token_changes(tok):
    texts = {200: TRICKY + _text(1500), 40: _cjk(2000, 20) + "<|endoftext|>" + _cjk(500, 20, 1)}
    for size, text in texts.items():
        runs = sources.bounded_runs(text, size)
        assert len(runs) > 10 and max(map(len, runs)) <= 2 * size
        assert sum((tok.encode(run) for run in runs), []) == tok.encode(text)
    run = _cjk(2000, None)
    assert [len(r) for r in sources.bounded_runs(run, 40)][:3] == [40, 40, 40]
