"""Training speed of our jitted AdamW step against transformers + torch, and peak memory.

    uv run python benchmarks/train_vs_hf.py ../bench/gpt2-124m-random

Measures, in one run on the same machine: the fp32 matmul peak (best of XLA and torch), our
train step (fp32 and bf16 compute) and transformers' GPT2LMHeadModel + torch.optim.AdamW on the
same weights, batch 8 x 128, 2 threads; then the peak resident memory of fine-tuning
gpt2-medium (random weights) at batch 4 x 256, ours and transformers'. The peer runs in its own
virtual environment (GPT2_PEER_PYTHON, default ../peer/bin/python from the repository root).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2

PEER_SPEED = textwrap.dedent(
    """
    import json, sys, time, torch
    from transformers import GPT2LMHeadModel
    torch.set_num_threads(int(sys.argv[2]))
    torch.manual_seed(0)
    batch, seq, steps, warmup = (int(x) for x in sys.argv[3:7])

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    matmul = 10 * 2 * n**3 / (time.perf_counter() - t) / 1e9

    model = GPT2LMHeadModel.from_pretrained(sys.argv[1], attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, model.config.vocab_size, (steps + warmup, batch, seq + 1))
    times = []
    for i in range(steps + warmup):
        t = time.perf_counter()
        x = ids[i]
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    print(json.dumps({"matmul_gflops": matmul, "step_s": times[warmup:]}))
    """
)

PEER_MEMORY = textwrap.dedent(
    """
    import json, resource, sys, torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.set_num_threads(int(sys.argv[1]))
    batch, seq = int(sys.argv[2]), int(sys.argv[3])
    model = GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        x = torch.randint(0, 50257, (batch, seq))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
    """
)

OUR_MEMORY = textwrap.dedent(
    """
    import json, resource, sys
    import jax, numpy as np
    from gpt2cli.config import preset
    from gpt2cli.model import init_params
    from gpt2cli.training.plan import train_config_for
    from gpt2cli.training.trainer import Trainer

    batch, seq = int(sys.argv[1]), int(sys.argv[2])
    config = preset("gpt2-medium")
    trainer = Trainer(config, train_config_for(config, batch_size=batch, seq_length=seq))
    state = trainer.create_state(jax.device_get(init_params(config)))
    rng = np.random.default_rng(0)
    for _ in range(2):
        tokens = rng.integers(0, config.vocab_size, (1, batch, seq + 1), dtype=np.int32)
        state, metrics = trainer.step(state, tokens)
        jax.block_until_ready(metrics)
    print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
    """
)


def peer_python() -> str:
    return os.environ.get("GPT2_PEER_PYTHON", str(ROOT.parent / "peer" / "bin" / "python"))


def run_json(cmd: list[str], env: dict | None = None) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"benchmark subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def xla_matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    for _ in range(3):
        dot(a, b).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        dot(a, b).block_until_ready()
    return reps * 2 * n**3 / (time.perf_counter() - t) / 1e9


class OurStep:
    """Our jitted train step on the benchmark model, compiled once, timed per call."""

    def __init__(self, model_dir: str, dtype: str, batch: int, seq: int):
        import numpy as np

        from gpt2cli.training.plan import train_config_for
        from gpt2cli.training.trainer import Trainer
        from gpt2cli.weights import load_hf_folder

        self.config, params = load_hf_folder(Path(model_dir))
        tc = train_config_for(self.config, batch_size=batch, seq_length=seq, lr=1e-4, dtype=dtype)
        self.trainer = Trainer(self.config, tc)
        self.state = self.trainer.create_state(params)
        rng = np.random.default_rng(0)
        self.batch = rng.integers(0, self.config.vocab_size, (1, batch, seq + 1), np.int32)
        self.time(1)  # compile

    def time(self, steps: int) -> list[float]:
        import jax

        times = []
        for _ in range(steps):
            t = time.perf_counter()
            self.state, metrics = self.trainer.step(self.state, self.batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        return times


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="HF folder of a GPT-2 124M (random weights are fine)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed torch steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="peer/ours alternations")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average, {os.cpu_count()} cores)")
    tokens = args.batch * args.seq
    ours = OurStep(args.model_dir, "float32", args.batch, args.seq)
    bf16 = OurStep(args.model_dir, "bfloat16", args.batch, args.seq)
    peer_steps, our_steps, bf16_steps, peaks = [], [], [], []
    for _ in range(args.rounds):  # alternate, so all see the same mix of machine load
        peer = run_json(
            [peer_python(), "-c", PEER_SPEED, args.model_dir, str(THREADS),
             str(args.batch), str(args.seq), str(args.steps), str(args.warmup)]
        )  # fmt: skip
        peer_steps += peer["step_s"]
        peaks += [peer["matmul_gflops"], xla_matmul_gflops()]
        our_steps += ours.time(args.steps)
        bf16_steps += bf16.time(args.steps)
    n_params = ours.config.num_params()
    peak = max(peaks)
    limit = peak * 1e9 / (6 * n_params)
    hf, ours_best = tokens / min(peer_steps), tokens / min(our_steps)
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s (best of {len(peaks)}, XLA and torch, 2048^3)")
    print(f"matmul-peak limit: {limit:.1f} tokens/s (6 x {n_params / 1e6:.1f}M FLOP per token)")
    print("tokens/s, best step (median step):")
    print(f"  transformers + torch AdamW fp32: {hf:.1f} ({tokens / median(peer_steps):.1f})")
    print(
        f"  gpt2 train fp32: {ours_best:.1f} ({tokens / median(our_steps):.1f}) = "
        f"{ours_best / hf:.2f}x transformers, {100 * ours_best / limit:.0f}% of the limit"
    )
    bf16_best = tokens / min(bf16_steps)
    print(
        f"  gpt2 train bf16: {bf16_best:.1f} ({tokens / median(bf16_steps):.1f}) = "
        f"{bf16_best / hf:.2f}x transformers fp32"
    )
    if not args.skip_memory:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        ours_mem = run_json([sys.executable, "-c", OUR_MEMORY, "4", "256"], env)
        peer_mem = run_json([peer_python(), "-c", PEER_MEMORY, str(THREADS), "4", "256"])
        print("peak RSS, fine-tuning gpt2-medium at batch 4 x 256 (AdamW, fp32):")
        print(f"  gpt2 train: {ours_mem['peak_rss_gib']:.2f} GiB")
        print(f"  transformers + torch: {peer_mem['peak_rss_gib']:.2f} GiB")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
