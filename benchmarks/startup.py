"""Median wall time of `gpt2 --help` against `python -c pass`, over 10 runs each.

    uv run python benchmarks/startup.py

Target: `gpt2 --help` under 0.5 s (it must not import JAX, Flax or transformers).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = 10


def median_seconds(command: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    gpt2 = shutil.which("gpt2", path=str(Path(sys.executable).parent)) or "gpt2"
    baseline = median_seconds([sys.executable, "-c", "pass"])
    help_time = median_seconds([gpt2, "--help"])
    print(f"python -c pass : {baseline:.3f} s (median of {RUNS})")
    print(f"gpt2 --help    : {help_time:.3f} s (median of {RUNS}), target < 0.5 s")
    print(f"ratio          : {help_time / baseline:.1f}x")


if __name__ == "__main__":
    main()
