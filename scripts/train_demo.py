"""Train the bundled `shakespeare` demo model with our own `gpt2 train`, reproducibly.

    uv run python scripts/train_demo.py            # about 15 minutes on 2 CPU cores

1. Split Tiny Shakespeare as nanoGPT does: the first 90% of the characters to train on, the
   last 10% to validate on.
2. Write a fresh small GPT-2 (the shape below, seed 0) as the starting .npz.
3. `gpt2 train` it on the first 90%, validating on the last 10% at the end.
4. Pack it for the wheel: bfloat16, compressed, and every row of the token embedding that the
   training text never uses replaced by one shared row (their mean), which compresses to almost
   nothing yet keeps those tokens as unlikely as training left them (a zero row would give them
   logit 0, above many real tokens). Written to gpt2cli/assets/shakespeare.npz.
5. `gpt2 eval -m shakespeare` on the last 10%, and a sample from `gpt2 generate`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
ASSET = ROOT / "gpt2cli" / "assets" / "shakespeare.npz"

# Small enough to train in minutes on 2 CPU cores; the 50257-row embedding is most of it.
SHAPE = {"n_positions": 128, "n_embd": 128, "n_layer": 4, "n_head": 4}
TRAIN = (
    "--steps", "600", "--batch-size", "16", "--seq-length", "128", "--lr", "2e-3",
    "--min-lr", "2e-4", "--warmup", "50", "--weight-decay", "0.1", "--dropout", "0.0",
    "--seed", "0", "--log-every", "25", "--save-every", "200", "--eval-batches", "16",
)  # fmt: skip


def gpt2(*args: str) -> None:
    command = [sys.executable, "-c", "from gpt2cli.cli.app import main; main()", *args]
    print("+ gpt2", " ".join(args), flush=True)
    subprocess.run(command, check=True)


def split(text_file: Path, work: Path) -> tuple[Path, Path]:
    text = text_file.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)  # nanoGPT's shakespeare split, by characters
    train, val = work / "train.txt", work / "val.txt"
    train.write_text(text[:cut], encoding="utf-8")
    val.write_text(text[cut:], encoding="utf-8")
    return train, val


def starting_model(path: Path) -> None:
    from gpt2cli.checkpoint import save_npz
    from gpt2cli.config import GPT2Config
    from gpt2cli.model import init_params

    config = GPT2Config(**SHAPE)
    save_npz(path, config, init_params(config, seed=0), force=True)


def pack(trained: Path, train_text: Path, out: Path) -> None:
    """bfloat16, compressed, unseen embedding rows shared (see the module docstring)."""
    import ml_dtypes

    from gpt2cli.checkpoint import load_npz, save_npz
    from gpt2cli.tokenizer import bundled

    config, params = load_npz(trained)
    seen = np.zeros(config.vocab_size, bool)
    seen[np.unique(bundled().encode(train_text.read_text(encoding="utf-8")))] = True
    wte = np.array(params["wte"]["embedding"])
    wte[~seen] = wte[~seen].mean(axis=0)
    params["wte"]["embedding"] = wte
    cast = {k: _cast(v, ml_dtypes.bfloat16) for k, v in params.items()}
    save_npz(out, config, cast, force=True, compressed=True)
    print(f"{out}: {out.stat().st_size / 2**20:.2f} MiB, {seen.sum()} of {seen.size} tokens seen")


def _cast(tree, dtype):
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return np.asarray(tree).astype(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=TEXT, help="Tiny Shakespeare")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "shakespeare-demo")
    parser.add_argument("--out", type=Path, default=ASSET)
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    train, val = split(args.text, args.work)
    start, run = args.work / "start.npz", args.work / "run"
    starting_model(start)
    gpt2("train", "-m", str(start), "--dataset", str(train), "--val-dataset", str(val),
         *TRAIN, "--out", str(run))  # fmt: skip
    pack(run / "final.npz", train, args.out)
    gpt2("eval", "-m", str(args.out), "--dataset", str(val))
    gpt2("generate", "ROMEO:", "-m", str(args.out), "-n", "40")


if __name__ == "__main__":
    main()
