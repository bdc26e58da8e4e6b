"""Seconds from `gpt2 train` starting to its first training step, cold and warm compile cache.

    uv run python benchmarks/first_step.py [--init gpt2] [--text FILE]

Runs `gpt2 train --init gpt2 --steps 1` twice with a fresh XDG cache folder: the first run
compiles (cold), the second loads the compiled step from JAX's persistent cache (warm). The
time of the first step is when the command prints "compiled the training step"; the line also
says how long the compile itself took.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def time_to_first_step(command: list[str], env: dict) -> tuple[float, str, float]:
    """(seconds to the first step, the compile line, seconds for the whole command)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    first, line_seen = None, ""
    for line in process.stderr:
        if first is None and line.startswith("compiled the training step"):
            first, line_seen = time.perf_counter() - start, line.strip()
    if process.wait() != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return first or float("nan"), line_seen, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", default="gpt2")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    args = parser.parse_args()
    gpt2 = shutil.which("gpt2", path=str(Path(sys.executable).parent)) or "gpt2"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": tmp, "GPT2_CACHE_DIR": tmp}
        env.pop("GPT2_NO_COMPILE_CACHE", None)
        for which in ("cold", "warm"):
            out = Path(tmp) / f"run-{which}"
            command = [gpt2, "train", "--init", args.init, "--dataset", str(args.text),
                       "--steps", "1", "--batch-size", "1", "--seq-length", "64",
                       "--out", str(out)]  # fmt: skip
            first, line, total = time_to_first_step(command, env)
            print(f"{which}: first step after {first:.1f} s ({line}); whole command {total:.1f} s")


if __name__ == "__main__":
    main()
