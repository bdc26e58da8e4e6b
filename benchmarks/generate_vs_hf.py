"""Decode speed of `gpt2cli` against Hugging Face transformers `generate`, in one run.

    uv run python benchmarks/generate_vs_hf.py ../bench/gpt2-124m-random

Measures, on a GPT-2 124M-shaped HF folder with 2 threads, batch 1, a 32-token prompt and
128 new tokens (greedy, EOS ignored): our decode tokens/s in float32 and bfloat16, batch 8,
transformers' `generate(use_cache=True)` (PyTorch, run with the peer venv found via
GPT2_PEER_PYTHON, default ../peer/bin/python), this machine's memory bandwidth and the
weight-streaming limit it implies, and compile time in a fresh process with an empty and with
a warm persistent compilation cache. Prints a table and the targets; `--json` for a record.
Each configuration runs in its own process so one cannot warm up another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HF_WORKER = r"""
import json, sys, time, torch
from transformers import GPT2LMHeadModel
folder, dtype, batch, prompt_len, new, threads, repeats = sys.argv[1:8]
batch, prompt_len, new, threads, repeats = map(int, (batch, prompt_len, new, threads, repeats))
torch.set_num_threads(threads)
model = GPT2LMHeadModel.from_pretrained(folder, torch_dtype=getattr(torch, dtype)).eval()
ids = torch.randint(0, 50000, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
def run(n):
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
    return time.perf_counter() - start
run(new)
one = min(run(1) for _ in range(repeats))
full = min(run(new) for _ in range(repeats))
print(json.dumps({"decode_tps": batch * (new - 1) / (full - one), "first_token_s": one}))
"""


def ours_worker(folder: str, dtype: str, batch: int, prompt_len: int, new: int, repeats: int):
    """Runs in a fresh process: what `gpt2 bench` measures (the first run compiles)."""
    from gpt2cli import compile_cache

    compile_cache.enable()
    from gpt2cli.cli.bench_cmd import measure
    from gpt2cli.generate import Engine
    from gpt2cli.hub import load_model

    config, params = load_model(folder)
    engine = Engine(config, params, dtype, batch=batch)
    result = measure(engine, batch, prompt_len, new, repeats)
    return {
        "decode_tps": result["decode_tokens_per_s"],
        "first_token_s": result["first_token_s"],
        "prefill_tps": result["prefill_tokens_per_s"],
        "compile_s": result["compile_s"],
        "peak_memory_mib": result["peak_memory_mib"],
    }


def bandwidth() -> dict:
    """Copy bandwidth of a 512 MB buffer (best of 5), counting bytes read + bytes written."""
    import numpy as np

    a = np.ones(128 * 1024 * 1024, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)  # touch every page once
    times = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - start)
    return {"copy_gbs": 2 * a.nbytes / min(times) / 1e9}


def spawn(args: list[str], env: dict | None = None) -> dict:
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        sys.exit(f"worker failed: {' '.join(args[:4])}...\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="../bench/gpt2-124m-random")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", nargs=2, metavar=("DTYPE", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (args.prompt_tokens, args.new_tokens)
    if args.worker:
        dtype, batch = args.worker[0], int(args.worker[1])
        print(json.dumps(ours_worker(args.model, dtype, batch, *shape, args.repeats)))
        return

    peer = os.environ.get("GPT2_PEER_PYTHON", str(ROOT.parent / "peer" / "bin" / "python"))
    if not Path(peer).exists():
        sys.exit(f"no peer python at {peer}: set GPT2_PEER_PYTHON to a venv with torch")
    me = [
        sys.executable,
        __file__,
        args.model,
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
    ]
    hf = lambda dtype: spawn(  # noqa: E731
        [
            peer,
            "-c",
            HF_WORKER,
            args.model,
            dtype,
            "1",
            *map(str, shape),
            str(args.threads),
            str(args.repeats),
        ]
    )
    with tempfile.TemporaryDirectory() as cache_home:
        fresh = {"XDG_CACHE_HOME": cache_home}
        results = {
            "bandwidth": bandwidth(),
            "hf_float32": hf("float32"),
            "hf_bfloat16": hf("bfloat16"),
            "ours_float32": spawn([*me, "--worker", "float32", "1"], fresh),  # cold cache
            "ours_float32_warm": spawn([*me, "--worker", "float32", "1"], fresh),
            "ours_bfloat16": spawn([*me, "--worker", "bfloat16", "1"], fresh),
            "ours_float32_b8": spawn([*me, "--worker", "float32", "8"], fresh),
        }
    report(results, args)


def report(r: dict, args) -> None:
    from gpt2cli.config import preset

    params = preset("gpt2").num_params()
    copy = r["bandwidth"]["copy_gbs"]
    limit32 = copy * 1e9 / (4 * params)
    limit16 = copy * 1e9 / (2 * params)
    f32, b16, b8 = r["ours_float32"], r["ours_bfloat16"], r["ours_float32_b8"]
    hf32, hf16 = r["hf_float32"]["decode_tps"], r["hf_bfloat16"]["decode_tps"]
    checks = [
        ("fp32 decode vs transformers fp32", f32["decode_tps"] / hf32, ">= 1.8x"),
        ("fp32 decode vs weight-streaming limit", f32["decode_tps"] / limit32, ">= 0.85"),
        ("bf16 decode vs transformers fp32", b16["decode_tps"] / hf32, ">= 2.5x"),
        ("bf16 decode vs transformers bf16", b16["decode_tps"] / hf16, "(info)"),
        ("bf16 decode vs bf16 weight-streaming limit", b16["decode_tps"] / limit16, "(info)"),
        ("batch 8 vs batch 1 throughput (fp32)", b8["decode_tps"] / f32["decode_tps"], ">= 3x"),
        ("compile, cold cache, s", f32["compile_s"], "< 5"),
        ("compile, warm persistent cache, s", r["ours_float32_warm"]["compile_s"], "< 1.5"),
    ]
    r["checks"] = {name: {"value": value, "target": target} for name, value, target in checks}
    r["limits"] = {"float32_tps": limit32, "bfloat16_tps": limit16}
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"GPT-2 124M, batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens")
    print(
        f"copy bandwidth (read + write) {copy:.1f} GB/s -> weight-streaming limit "
        f"{limit32:.1f} tok/s fp32, {limit16:.1f} tok/s bf16"
    )

    print(
        f"{'run':<22}{'decode tok/s':>14}{'prefill tok/s':>15}{'first token s':>15}{'compile s':>11}"
    )
    for name in (
        "hf_float32",
        "hf_bfloat16",
        "ours_float32",
        "ours_float32_warm",
        "ours_bfloat16",
        "ours_float32_b8",
    ):
        row = r[name]
        print(
            f"{name:<22}{row['decode_tps']:>14.1f}{row.get('prefill_tps', float('nan')):>15.1f}"
            f"{row['first_token_s']:>15.3f}{row.get('compile_s', float('nan')):>11.2f}"
        )
    for name, value, target in checks:
        print(f"{name:<45}{value:>8.2f}  target {target}")


if __name__ == "__main__":
    main()
