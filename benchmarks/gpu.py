"""Ours and the peers on one accelerator, side by side in one run, as one table.

    python3 benchmarks/gpu.py                        # everything, peers from ../shared/gpu
    python3 benchmarks/gpu.py --peers DIR            # DIR holds peers_gpu.py and nanogpt/model.py
    python3 benchmarks/gpu.py --only train,train-variants,decode-variants,cost   # ours alone
    python3 benchmarks/gpu.py --dry-run              # a tiny model and a few steps: checks the script on a CPU

Figures (GPT-2 124M with random weights, shared with the peers through a Hugging Face folder):
training tokens/s at 16 x 1024 (AdamW, grad clip 1.0, no dropout, as nanoGPT's benchmark) in
bfloat16, tf32 and float32 for us, transformers (eager, bf16 autocast / TF32, fused AdamW) and
nanoGPT (torch.compile, flash attention, bf16), with MFU against the card's dense bf16 peak;
greedy decode tokens/s after a 32-token prompt, 256 new tokens, at batch 1, 8 and 64; float32
fidelity (our logits on this device against transformers' in float64, greedy tokens equal).

The peer side needs torch and transformers, which such a machine has; they are never project
dependencies. Each figure is also printed as one JSON line as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Peers run in subprocesses beside this one: JAX must not take 75% of the GPU at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BF16_PEAK = 989e12  # dense bfloat16 FLOP/s of an H100/H200 SXM (datasheet)
DECODES = (("float32", 1), ("bfloat16", 1), ("float32", 8), ("bfloat16", 64))


def emit(record: dict, results: list) -> None:
    results.append(record)
    print(json.dumps(record), flush=True)


def make_model(folder: Path, dry: bool):
    """A random GPT-2 (124M, or the tiny preset for a dry run) saved as a Hugging Face folder."""
    from gpt2cli.config import preset
    from gpt2cli.model import init_params
    from gpt2cli.weights import save_hf_folder

    config = preset("tiny" if dry else "gpt2")
    params = init_params(config, seed=0)
    save_hf_folder(folder, config, params, force=True)
    return config, params


def flops_per_token(config, seq: int) -> float:
    """6 N for the weights plus the attention scores and sums (PaLM's count, nanoGPT's MFU)."""
    weights = config.num_params() - config.n_positions * config.n_embd
    return 6 * weights + 12 * config.n_layer * config.n_embd * seq


# ---- ours ------------------------------------------------------------------------------


def ours_train(config, params, dtype, batch, seq, steps, loss_chunks=None, remat=False, **kernels):
    import dataclasses

    import jax
    import numpy as np

    from gpt2cli.training.plan import train_config_for
    from gpt2cli.training.trainer import Trainer

    tc = train_config_for(
        config,
        batch_size=batch, seq_length=seq, dtype=dtype, dropout=0.0, warmup=10, decay_steps=1000,
        remat=remat,
    )  # fmt: skip
    trainer = Trainer(config, tc, loss_chunks=loss_chunks)
    trainer.kernels = dataclasses.replace(trainer.kernels, **kernels)
    state = trainer.create_state(params)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch, seq + 1))
    placed = trainer.place(tokens)
    started = time.perf_counter()
    for _ in range(3):
        state, metrics = trainer.step(state, placed)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.step(state, placed)
    loss = float(metrics["loss"])  # waits for the last step
    elapsed = time.perf_counter() - started
    return {
        "tok_s": round(batch * seq * steps / elapsed),
        "compile_and_3_steps_s": round(compile_s, 1),
        "loss": round(loss, 3),
        "kernels": str(trainer.kernels),
        "loss_chunks": trainer.loss_chunks,
        "peak_gb": round(_peak_bytes() / 1e9, 1),
    }


def _peak_bytes() -> int:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0)


def ours_decode(
    config, params, dtype, batch, prompt, new, chunk=None, stream=True, **kernel_changes
):
    import dataclasses

    from gpt2cli import kernels, precision
    from gpt2cli.cli.bench_cmd import measure
    from gpt2cli.engine import Engine

    chosen = kernels.choose(precision.get(dtype), batch=batch)
    chosen = dataclasses.replace(chosen, **kernel_changes)
    engine = Engine(config, params, dtype, chunk=chunk, batch=batch, chosen=chosen)
    figures = measure(engine, batch, prompt, new, repeats=3, stream=stream)
    return {
        "tok_s": round(figures["decode_tokens_per_s"], 1),
        "compile_s": round(figures["compile_s"], 1),
        "chunk": engine.chunk,
        "kernels": str(engine.kernels),
    }


def fidelity(folder: Path, config, params) -> list[dict]:
    """Our logits and greedy tokens on this device against transformers' float64 on the CPU."""
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel

    import gpt2cli
    from gpt2cli.engine import Engine, SamplingParams
    from gpt2cli.generate import TokenRun

    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float64).eval()
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 64))
    with torch.no_grad():
        reference = hf(torch.tensor(ids)).logits.numpy()
        prompt = torch.tensor(ids[:1, :16])
        hf_tokens = hf.generate(
            prompt, max_new_tokens=32, do_sample=False, pad_token_id=0, attention_mask=None
        )[0, 16:].tolist()
    records = []
    for dtype in ("float32", "tf32"):
        ours = np.asarray(gpt2cli.logits(config, params, ids, dtype=dtype), np.float64)
        error = np.abs(ours - reference).max()
        engine = Engine(config, params, dtype)
        run = TokenRun(
            engine, [ids[0, :16].tolist()], max_new_tokens=32, sampling_params=SamplingParams()
        )
        tokens = [int(t[0]) for t in run]
        records.append(
            {
                "what": "fidelity",
                "dtype": dtype,
                "max_abs_error": float(error),
                "max_rel_error": float(error / np.abs(reference).max()),
                "greedy_equal": tokens == hf_tokens,
            }
        )
    return records


# ---- peers -----------------------------------------------------------------------------


def peers(peer_dir: Path, folder: Path, jobs: list[str], timeout: int) -> list[dict]:
    records = []
    runs = {
        "decode": [str(folder), "decode"],
        "train": [str(folder), "train"],
        "nanogpt": [str(peer_dir / "nanogpt"), "nanogpt"],
    }
    for job in jobs:
        command = [sys.executable, str(peer_dir / "peers_gpu.py"), *runs[job]]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            records.append({"peer": job, "error": f"timed out after {timeout} s"})
            continue
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        records += [json.loads(line) for line in lines]
        if done.returncode:
            records.append({"peer": job, "error": done.stderr.strip().splitlines()[-1:]})
    return records


# ---- the table ---------------------------------------------------------------------------


def table(results: list[dict], per_token: float) -> str:
    def find(**match):
        for r in results:
            if all(r.get(k) == v for k, v in match.items()) and "tok_s" in r:
                return r["tok_s"]
        return None

    def fmt(x):
        return "-" if x is None else f"{x:,.0f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    def mfu(x):
        return "-" if x is None else f"{x * per_token / BF16_PEAK:.1%}"

    rows = [("job", "ours", "peer", "peer tok/s", "ratio", "our MFU")]
    nano = find(peer="nanoGPT (torch.compile, flash attention)", what="train")
    hf_train = {
        d: find(peer="transformers", what="train", dtype=d) for d in ("bfloat16", "float32")
    }
    for dtype in ("bfloat16", "tf32", "float32"):
        ours = find(side="ours", what="train", dtype=dtype, variant="default")
        peer_dtype = "bfloat16" if dtype == "bfloat16" else "float32"
        rows.append(
            (f"train {dtype}", fmt(ours), "transformers", fmt(hf_train[peer_dtype]),
             ratio(ours, hf_train[peer_dtype]), mfu(ours))
        )  # fmt: skip
        if dtype == "bfloat16":
            rows.append(("", "", "nanoGPT", fmt(nano), ratio(ours, nano), ""))
    for dtype, batch in DECODES:
        ours = find(side="ours", what="decode", dtype=dtype, batch=batch, variant="default")
        peer = find(peer="transformers", what="decode", dtype=dtype, batch=batch)
        rows.append(
            (
                f"decode {dtype} b{batch}",
                fmt(ours),
                "transformers",
                fmt(peer),
                ratio(ours, peer),
                "",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)) for r in rows]
    for r in results:
        if "error" in r:
            lines.append(f"error: {r}")
        elif r.get("what") == "cost":
            tok_s = find(side="ours", what="train", dtype="bfloat16", variant="default")
            steps_s = tok_s / r["tokens_per_step"] if tok_s else 0
            lines.append(
                f"XLA's count for one bf16 train step: {r['flops'] / 1e12:.1f} TFLOP, "
                f"{r['bytes_accessed'] / 1e9:.1f} GB accessed, {r['temp_bytes'] / 1e9:.1f} GB "
                f"temporaries; at the measured speed {r['flops'] * steps_s / 1e12:.0f} TFLOP/s, "
                f"{r['bytes_accessed'] * steps_s / 1e12:.2f} TB/s"
            )
        elif r.get("what") == "profile":
            lines.append(
                f"profile {r['of']}: {r['launches'] / r['per']:.0f} kernels and "
                f"{r['busy_us'] / r['per'] / 1000:.2f} ms of kernel time per "
                f"{'step' if r['of'] == 'train' else 'token'}, "
                f"{r['span_us'] / r['per'] / 1000:.2f} ms wall on the device"
            )
            lines += [
                f"    {t / r['per'] / 1000:7.3f} ms  {n / r['per']:5.1f}x  {k}"
                for k, n, t in r["top"]
            ]
        elif r.get("what") == "fidelity":
            lines.append(
                f"fidelity {r['dtype']}: max |logit error| {r['max_abs_error']:.2e} "
                f"(relative {r['max_rel_error']:.2e}), greedy equal: {r['greedy_equal']}"
            )
        if r.get("variant") not in (None, "default") and "tok_s" in r:
            lines.append(
                f"variant {r['what']} {r['dtype']} b{r.get('batch', '')} {r['variant']}: "
                f"{r['tok_s']:,} tok/s"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=Path, default=Path("../shared/gpu"))
    parser.add_argument(
        "--only",
        default="peers,train,decode,fidelity",
        help=f"stages to run, in this order (of: {', '.join(STAGES)})",
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny model, few steps")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, help="keep every record here as JSON, as it comes")
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")

    import jax

    results: list[dict] = []

    def record(item: dict) -> None:
        emit(item, results)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    record({"what": "device", "device": str(jax.devices()[0]), "jax": jax.__version__})
    shape = (2, 64, 2, 16) if args.dry_run else (16, 1024, args.steps, 256)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-random"
        config, params = make_model(folder, args.dry_run)
        run = Run(config, params, folder, args.peers, *shape, record)
        for stage in args.only.split(","):
            STAGES[stage](run)
    print(table(results, flops_per_token(config, shape[1])), flush=True)


@dataclass
class Run:
    config: Any
    params: Any
    folder: Path
    peer_dir: Path
    batch: int
    seq: int
    steps: int
    new: int
    record: Callable[[dict], None]

    def train(self, dtype: str, variant: str = "default", **options) -> None:
        try:
            figures = ours_train(
                self.config, self.params, dtype, self.batch, self.seq, self.steps, **options
            )
        except Exception as error:  # a variant XLA refuses must not end the run
            figures = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        self.record(
            {"side": "ours", "what": "train", "dtype": dtype, "variant": variant, **figures}
        )

    def decode(self, dtype: str, rows: int, variant: str = "default", **options) -> None:
        try:
            figures = ours_decode(self.config, self.params, dtype, rows, 32, self.new, **options)
        except Exception as error:
            figures = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        self.record(
            {"side": "ours", "what": "decode", "dtype": dtype, "batch": rows, "variant": variant,
             **figures}
        )  # fmt: skip


def stage_peers(run: Run) -> None:
    if not (run.peer_dir / "peers_gpu.py").exists():
        run.record({"peer": "all", "error": f"no {run.peer_dir}/peers_gpu.py"})
        return
    for item in peers(run.peer_dir, run.folder, ["decode", "train", "nanogpt"], timeout=600):
        run.record(item)


def stage_train(run: Run) -> None:
    for dtype in ("bfloat16", "tf32", "float32"):
        run.train(dtype)


COMMAND_BUFFERS_WITH_LOOPS = (
    ("xla_gpu_enable_command_buffer", "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"),
)
NO_COMMAND_BUFFERS = (("xla_gpu_enable_command_buffer", ""),)
CUBLASLT = (("xla_gpu_enable_cublaslt", True),)
NO_TRITON_GEMM = (("xla_gpu_enable_triton_gemm", False),)


def stage_train_variants(run: Run) -> None:
    run.train("bfloat16", "vocab not padded", vocab_multiple=1)
    run.train("bfloat16", "loss in 4 slices", loss_chunks=4)
    run.train("bfloat16", "cuBLASLt", compile_options=CUBLASLT)
    run.train("bfloat16", "no Triton GEMMs", compile_options=NO_TRITON_GEMM)
    run.train("bfloat16", "einsum attention", attention_impl="einsum")
    run.train("bfloat16", "remat", remat=True)


def stage_decode(run: Run) -> None:
    for dtype, rows in DECODES:
        run.decode(dtype, rows)


def stage_decode_variants(run: Run) -> None:
    for rows in (1, 64):
        run.decode("bfloat16", rows, "whole run in one call", stream=False)
        run.decode("bfloat16", rows, "one row not padded", pad_one_row=False)
        run.decode("bfloat16", rows, "cache written last", cache_write="last")
        run.decode(
            "bfloat16", rows, "graphs over loops", compile_options=COMMAND_BUFFERS_WITH_LOOPS
        )
        run.decode("bfloat16", rows, "no graphs", compile_options=NO_COMMAND_BUFFERS)
        run.decode("bfloat16", rows, "cuBLASLt", compile_options=CUBLASLT)


def stage_fidelity(run: Run) -> None:
    try:
        for item in fidelity(run.folder, run.config, run.params):
            run.record(item)
    except ImportError as error:
        run.record({"what": "fidelity", "error": f"needs torch and transformers: {error}"})


def stage_cost(run: Run) -> None:
    """XLA's own count of the bfloat16 train step's FLOPs and bytes (what bounds it)."""
    import numpy as np

    from gpt2cli.training.plan import train_config_for
    from gpt2cli.training.trainer import Trainer

    tc = train_config_for(
        run.config, batch_size=run.batch, seq_length=run.seq, dtype="bfloat16", dropout=0.0
    )
    trainer = Trainer(run.config, tc)
    state = trainer.create_state(run.params)
    tokens = np.zeros((1, run.batch, run.seq + 1), np.int32)
    trainer.step(state, tokens)  # builds the jitted step
    compiled = trainer._step.lower(state, trainer.place(tokens)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    run.record(
        {"what": "cost", "dtype": "bfloat16", "flops": cost.get("flops"),
         "bytes_accessed": cost.get("bytes accessed"),
         "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
         "tokens_per_step": run.batch * run.seq}
    )  # fmt: skip


def gpu_kernel_times(trace_dir: Path) -> tuple[dict, float]:
    """(kernel name -> [count, total µs]) over the device lanes of a perfetto trace, and the
    span from the first kernel's start to the last one's end, µs."""
    import collections
    import gzip

    (path,) = trace_dir.glob("**/perfetto_trace.json.gz")
    with gzip.open(path) as file:
        events = json.load(file)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device = {pid for pid, name in names.items() if "GPU" in name or "device" in name.lower()}
    kernels = collections.defaultdict(lambda: [0, 0.0])
    start, end = float("inf"), 0.0
    for e in events:
        if e.get("ph") == "X" and e["pid"] in device:
            kernels[e["name"]][0] += 1
            kernels[e["name"]][1] += e["dur"]
            start, end = min(start, e["ts"]), max(end, e["ts"] + e["dur"])
    kernels["(lanes)"] = [0, 0.0, sorted(set(names.values()))[:12]]
    return dict(kernels), max(end - start, 0.0)


def stage_profile(run: Run) -> None:
    """Where the device's time goes: the kernels of 3 bf16 train steps and of one decode chunk."""
    import jax
    import numpy as np

    from gpt2cli.engine import Engine, SamplingParams
    from gpt2cli.generate import TokenRun
    from gpt2cli.training.plan import train_config_for
    from gpt2cli.training.trainer import Trainer

    tc = train_config_for(
        run.config, batch_size=run.batch, seq_length=run.seq, dtype="bfloat16", dropout=0.0
    )
    trainer = Trainer(run.config, tc)
    state = trainer.create_state(run.params)
    tokens = np.random.default_rng(0).integers(
        0, run.config.vocab_size, (1, run.batch, run.seq + 1)
    )
    placed = trainer.place(tokens)
    for _ in range(2):
        state, metrics = trainer.step(state, placed)
    jax.block_until_ready(metrics["loss"])
    engine = Engine(run.config, run.params, "bfloat16", batch=1)
    prompt = [list(range(32))]
    list(
        TokenRun(engine, prompt, max_new_tokens=engine.chunk + 1, sampling_params=SamplingParams())
    )
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(f"{tmp}/train", create_perfetto_trace=True):
            for _ in range(3):
                state, metrics = trainer.step(state, placed)
            jax.block_until_ready(metrics["loss"])
        train_kernels, train_span = gpu_kernel_times(Path(tmp) / "train")
        run_tokens = TokenRun(
            engine, prompt, max_new_tokens=engine.chunk + 1, sampling_params=SamplingParams()
        )
        with jax.profiler.trace(f"{tmp}/decode", create_perfetto_trace=True):
            list(run_tokens)
        decode_kernels, decode_span = gpu_kernel_times(Path(tmp) / "decode")
    for what, found, span, per in (
        ("train", train_kernels, train_span, 3),
        ("decode", decode_kernels, decode_span, engine.chunk + 1),
    ):
        lanes = found.pop("(lanes)")[2]
        busy = sum(t for _, t in found.values())
        top = sorted(found.items(), key=lambda kv: -kv[1][1])[:15]
        run.record(
            {"what": "profile", "of": what, "per": per, "span_us": round(span),
             "busy_us": round(busy), "launches": sum(n for n, _ in found.values()), "lanes": lanes,
             "top": [[name[:90], n, round(t)] for name, (n, t) in top]}
        )  # fmt: skip


STAGES = {
    "profile": stage_profile,
    "peers": stage_peers,
    "train": stage_train,
    "decode": stage_decode,
    "fidelity": stage_fidelity,
    "cost": stage_cost,
    "train-variants": stage_train_variants,
    "decode-variants": stage_decode_variants,
}


if __name__ == "__main__":
    main()
