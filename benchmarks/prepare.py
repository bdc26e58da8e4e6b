"""`gpt2 prepare` against the tokenizer alone, and training memory on a small vs a big corpus.

    uv run python benchmarks/prepare.py throughput [--mb 64] [--workers 2]
    uv run python benchmarks/prepare.py memory [--small-mb 20] [--big-mb 2048] [--tmp /tmp/gpt2-bench]
    uv run python benchmarks/prepare.py scripts [--mb 40] [--workers 1]

throughput: the same text (Tiny Shakespeare repeated, or --text FILE) tokenized three ways:
  tiktoken's own `encode_batch` over 1 MB pieces with --workers threads (the chosen tokenizer),
  tokenizers' `encode_batch` over the same pieces (the other candidate), and `gpt2 prepare`'s
  pipeline (read, cut, worker processes, shard writing). Target: prepare >= 0.9x tiktoken.
memory: prepares a small and a big corpus under --tmp (never in the repository; mind the disk),
  then runs `gpt2 train --init tiny` on each and reads its peak RSS. Target: big within 1.2x small.
scripts: peak RSS of `gpt2 prepare` on --mb of English and of generated Chinese-like text (with
  a 。 or 、 every 25 characters and a newline every 300; and with no break at all), which has
  no spaces to cut at. Target: each within 2x the English run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PIECE = 1 << 20


def corpus(path: Path, megabytes: int, source: Path) -> Path:
    """`megabytes` of text: the source repeated, each copy numbered so no two are equal."""
    text = source.read_text("utf-8")
    target = megabytes << 20
    with open(path, "w", encoding="utf-8") as f:
        copy = 0
        while f.tell() < target:
            f.write(f"Copy {copy}.\n{text}\n")
            copy += 1
    return path


def pieces(text: str) -> list[str]:
    return [text[i : i + PIECE] for i in range(0, len(text), PIECE)]


def throughput(args) -> None:
    from gpt2cli.tokenizer import bundled, bundled_files, fast_encoder
    from gpt2cli.training.prepare import PrepareSettings, prepare

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = corpus(Path(tmp) / "corpus.txt", args.mb, args.text)
        size = path.stat().st_size
        batch = pieces(path.read_text("utf-8"))
        encoder, tok = fast_encoder(bundled_files()[0]), bundled()
        rates = {}
        start = time.perf_counter()
        encoder.encode_batch(batch, num_threads=args.workers, allowed_special="all")
        rates["tiktoken encode_batch"] = size / (time.perf_counter() - start)
        start = time.perf_counter()
        tok.backend.encode_batch(batch, add_special_tokens=False)
        rates["tokenizers encode_batch"] = size / (time.perf_counter() - start)
        start = time.perf_counter()
        prepare([path], Path(tmp) / "out", PrepareSettings(), workers=args.workers)
        rates["gpt2 prepare"] = size / (time.perf_counter() - start)
    print(f"{args.mb} MB of text, {args.workers} workers")
    for name, rate in rates.items():
        print(f"  {name:24s} {rate / 1e6:6.2f} MB/s")
    ratio = rates["gpt2 prepare"] / rates["tiktoken encode_batch"]
    print(f"  prepare / tiktoken alone: {ratio:.2f}x (target >= 0.9x)")


def peak_rss_mb(command: list[str]) -> float:
    """Peak resident memory of one command, measured by a Python of its own (ru_maxrss of
    RUSAGE_CHILDREN is the largest child so far, so each run needs a fresh parent; KiB on Linux)."""
    probe = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True)
    return int(done.stdout) / 1024


def memory(args) -> None:
    gpt2 = shutil.which("gpt2", path=str(Path(sys.executable).parent)) or "gpt2"
    work = Path(args.tmp) / "gpt2-prepare-bench"
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, mb in (("small", args.small_mb), ("big", args.big_mb)):
        text, folder = work / f"{name}.txt", work / f"{name}-prepared"
        if not (folder / "index.json").is_file():
            corpus(text, mb, args.text)
            start = time.perf_counter()
            subprocess.run([gpt2, "prepare", str(text), "--out", str(folder)], check=True)
            print(f"prepared {mb} MB in {time.perf_counter() - start:.0f} s")
            text.unlink()
        out = work / f"run-{name}"
        shutil.rmtree(out, ignore_errors=True)
        command = [gpt2, "train", "--init", "tiny", "--dataset", str(folder), "--out", str(out)]
        command += ["--steps", str(args.steps), "--batch-size", "8", "--eval-every", "50"]
        results[name] = peak_rss_mb(command)
        print(f"{name:5s} corpus ({mb} MB of text): peak RSS {results[name]:.0f} MB")
    print(f"big / small: {results['big'] / results['small']:.2f}x (target <= 1.2x)")
    if not args.keep:
        shutil.rmtree(work)


def chinese(path: Path, megabytes: int, marks: bool) -> Path:
    """`megabytes` of random CJK ideographs (3 bytes each), with or without punctuation."""
    rng = np.random.default_rng(0)
    chars = (megabytes << 20) // 3
    codes = rng.integers(0x4E00, 0x9FA5, chars)
    if marks:
        codes[rng.random(chars) < 1 / 25] = 0x3002
        codes[rng.random(chars) < 1 / 25] = 0x3001
        codes[rng.random(chars) < 1 / 300] = 0x0A
    path.write_text("".join(map(chr, codes.tolist())), encoding="utf-8")
    return path


def scripts(args) -> None:
    gpt2 = shutil.which("gpt2", path=str(Path(sys.executable).parent)) or "gpt2"
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        texts = {
            "English": corpus(Path(tmp) / "en.txt", args.mb, args.text),
            "Chinese, punctuated": chinese(Path(tmp) / "zh.txt", args.mb, marks=True),
            "Chinese, no break": chinese(Path(tmp) / "zh-run.txt", args.mb, marks=False),
        }
        peaks = {}
        for name, text in texts.items():
            out = Path(tmp) / f"{text.stem}-prepared"
            command = [gpt2, "prepare", str(text), "--out", str(out)]
            peaks[name] = peak_rss_mb([*command, "--workers", str(args.workers)])
            size = text.stat().st_size / 2**20
            print(f"{name:20s} {size:5.1f} MB: peak RSS {peaks[name]:4.0f} MB")
    for name in list(texts)[1:]:
        print(f"{name} / English: {peaks[name] / peaks['English']:.2f}x (target <= 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["throughput", "memory", "scripts"])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text to repeat")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where corpora are made")
    parser.add_argument("--mb", type=int, default=64, help="throughput / scripts corpus size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--small-mb", type=int, default=20)
    parser.add_argument("--big-mb", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the prepared corpora")
    args = parser.parse_args()
    {"throughput": throughput, "memory": memory, "scripts": scripts}[args.what](args)


if __name__ == "__main__":
    main()
