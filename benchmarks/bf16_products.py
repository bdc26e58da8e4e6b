"""Why bfloat16 decoding is no faster than float32 here: the weight products alone, XLA vs torch.

    uv run python benchmarks/bf16_products.py

Batch-1 decoding of GPT-2 124M is 49 one-row products per layer stack plus the tied LM head:
per layer [1, 768] times c_attn (768x2304), attn c_proj (768x768), c_fc (768x3072) and mlp
c_proj (3072x768), then the head (768x50257). This times that chain alone (random weights,
2 threads, best of several runs), as our decode runs it in float32 and in bfloat16, as XLA runs
a plain bfloat16 dot, and as PyTorch runs `F.linear` in both dtypes (the peer venv found via
GPT2_PEER_PYTHON, default ../peer/bin/python). Reading the weights once per token at the
measured rate gives the ceiling on decode tokens/s. When bfloat16 products run no faster per
weight than float32 ones, halving the bytes buys nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYER = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of one block
N_LAYER, VOCAB, D = 12, 50257, 768
PARAMS = N_LAYER * sum(i * o for i, o in LAYER) + VOCAB * D

TORCH_WORKER = r"""
import json, sys, time, torch
import torch.nn.functional as F
layer, n_layer, vocab, d, repeats = json.loads(sys.argv[1])
torch.set_num_threads(2)
out = {}
for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(o, i, generator=g).mul_(0.02).to(dtype)
            for _ in range(n_layer) for i, o in layer]
    head = torch.randn(vocab, d, generator=g).mul_(0.02).to(dtype)
    def chain(x):
        for w in mats:
            x = torch.tanh(F.linear(x[:, : w.shape[1]], w))
        return F.linear(x[:, :d], head)
    x = torch.randn(1, 3072, generator=g).to(dtype)
    with torch.inference_mode():
        chain(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            chain(x)
            times.append(time.perf_counter() - start)
    out["torch " + name] = min(times)
print(json.dumps(out))
"""


def ours(repeats: int) -> dict[str, float]:
    """Seconds per chain for each way of running the products in JAX."""
    import jax
    import jax.numpy as jnp

    from gpt2cli.kernels import Kernels

    rows_times_in_out = Kernels(backend="cpu", products="default", pad_one_row=True).linear
    rows_times_out_in = Kernels(backend="cpu", products="default", out_in=True).linear

    keys = iter(jax.random.split(jax.random.key(0), len(LAYER) * N_LAYER + 2))
    in_out = [jax.random.normal(next(keys), shape) * 0.02 for shape in LAYER * N_LAYER]
    head = jax.random.normal(next(keys), (VOCAB, D)) * 0.02  # (out, in), as the tied head
    x = jax.random.normal(next(keys), (1, 3072))

    def chain(product, head_product):
        def run(x, kernels, head):
            for (d_in, _), kernel in zip(LAYER * N_LAYER, kernels, strict=True):
                x = jnp.tanh(product(x[:, :d_in], kernel))
            return head_product(x[:, :D], head)

        return jax.jit(run)

    def plain(x, kernel):  # [1, in] x [in, out], as XLA runs it unassisted
        return jax.lax.dot_general(x, kernel, (((1,), (0,)), ((), ())))

    def plain_head(x, table):  # [1, D] x [V, D]^T
        return jax.lax.dot_general(x, table, (((1,), (1,)), ((), ())))

    bf16 = [k.astype(jnp.bfloat16) for k in in_out]
    bf16_head, bf16_x = head.astype(jnp.bfloat16), x.astype(jnp.bfloat16)
    cases = {  # float32 decode runs (out, in) kernels; bfloat16 decode (in, out) ones
        "ours float32": (
            chain(rows_times_out_in, rows_times_out_in),
            x,
            [k.T for k in in_out],
            head,
        ),
        "ours bfloat16": (chain(rows_times_in_out, rows_times_out_in), bf16_x, bf16, bf16_head),
        "xla bfloat16 dot": (chain(plain, plain_head), bf16_x, bf16, bf16_head),
    }
    result = {}
    for name, (fn, *args) in cases.items():
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(repeats if name != "xla bfloat16 dot" else 2):  # that one is slow
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        result[name] = min(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print one JSON record")
    args = parser.parse_args()

    peer = os.environ.get("GPT2_PEER_PYTHON", str(ROOT.parent / "peer" / "bin" / "python"))
    spec = json.dumps([LAYER, N_LAYER, VOCAB, D, args.repeats])
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    torch = subprocess.run(
        [peer, "-c", TORCH_WORKER, spec], capture_output=True, text=True, env=env, check=True
    )
    seconds = {**ours(args.repeats), **json.loads(torch.stdout)}

    rows = []
    for name, s in seconds.items():
        weight_bytes = PARAMS * (2 if "bfloat16" in name else 4)
        rows.append(
            {
                "case": name,
                "ms_per_token": 1e3 * s,
                "gparams_per_s": PARAMS / s / 1e9,
                "gb_per_s": weight_bytes / s / 1e9,
                "ceiling_tps": 1 / s,
            }
        )
    if args.json:
        print(json.dumps({"params": PARAMS, "rows": rows}))
        return
    print(f"GPT-2 124M one-row weight products ({PARAMS:,} weights), 2 threads, best time:")
    print(f"{'case':24} {'ms/token':>9} {'Gweights/s':>11} {'GB/s':>7} {'ceiling tok/s':>14}")
    for r in rows:
        print(
            f"{r['case']:24} {r['ms_per_token']:9.2f} {r['gparams_per_s']:11.2f}"
            f" {r['gb_per_s']:7.1f} {r['ceiling_tps']:14.1f}"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
