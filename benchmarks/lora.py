"""What LoRA costs and saves: `gpt2 train --lora` on a random gpt2-xl-shaped model (1.56 B
parameters) at --batch-size 1 --seq-length 256 (peak RSS, tokens/s), and LoRA against a full
fine-tune of GPT-2 124M in tokens/s.

    uv run python benchmarks/lora.py [--text FILE] [--steps 6] [--xl-steps 3] [--skip-xl]

Each run is a `gpt2 train --init ...` process of its own (random weights: the speed and memory
do not depend on their values); its peak RSS comes from wait4, its speed is the median of the
tokens/s that metrics.jsonl logs after the first step (which includes compiling).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def train(gpt2: str, flags: list[str], out: Path, env: dict) -> dict:
    """One run: peak RSS (GB), median tokens/s after the first step, its memory line."""
    log = out.with_suffix(".log")
    command = [gpt2, "train", *flags, "--out", str(out), "--log-every", "1",
               "--val-fraction", "0", "--save-every", "0"]  # fmt: skip
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stderr=stderr, stdout=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    lines = log.read_text().splitlines()
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n" + "\n".join(lines[-5:]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    memory = next((line for line in lines if line.startswith("memory:")), "")
    return {
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
        "tokens_per_s": round(statistics.median(speeds), 1),
        "estimate": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--xl-steps", type=int, default=3, help="tens of seconds each on a CPU")
    parser.add_argument("--skip-xl", action="store_true")
    args = parser.parse_args()
    gpt2 = shutil.which("gpt2", path=str(Path(sys.executable).parent)) or "gpt2"
    data = ["--dataset", str(args.text)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GPT2_CACHE_DIR": tmp, "GPT2_NO_COMPILE_CACHE": "1"}
        small = [*data, "--steps", str(args.steps), "--init", "gpt2", "--batch-size", "4",
                 "--seq-length", "256"]  # fmt: skip
        results["gpt2_full"] = train(gpt2, small, Path(tmp, "full"), env)
        results["gpt2_lora"] = train(gpt2, [*small, "--lora"], Path(tmp, "lora"), env)
        if not args.skip_xl:
            xl = [*data, "--steps", str(args.xl_steps), "--init", "gpt2-xl", "--batch-size", "1",
                  "--seq-length", "256"]  # fmt: skip
            results["xl_lora"] = train(gpt2, [*xl, "--lora"], Path(tmp, "xl"), env)
    full, lora = results["gpt2_full"]["tokens_per_s"], results["gpt2_lora"]["tokens_per_s"]
    results["gpt2_lora_speedup"] = round(lora / full, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
