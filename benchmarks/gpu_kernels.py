"""The kernels XLA:GPU would launch for our decode and training steps, counted without a GPU.

Given a card's description, XLA compiles for a GPU it does not have (a deviceless, ahead-of-time
compile). The optimized program then shows each kernel a step launches, whether the host must
wait on the device after every iteration of a loop, and the [B, T, V] and [B, H, T, T] arrays
a training step writes. So GPU paths can be tuned in sessions without a GPU: this counts work on
any machine, `gpu.py` measures time on a real card.

    # once: the CUDA build of the project's jax in a throw-away venv outside the repo (~6 GB)
    uv venv ../aot && uv pip install -p ../aot flax optax numpy typer rich safetensors \\
        tokenizers "jax[cuda12]==$(uv run python -c 'import jax; print(jax.__version__)')"
    PYTHONPATH=. JAX_PLATFORMS=cpu ../aot/bin/python benchmarks/gpu_kernels.py   # H100, 124M
    uv run python benchmarks/gpu_kernels.py --platform cpu --model tiny   # the CPU's programs

"Kernels" are the program's thunks: fusions, library calls (cuBLAS, cuDNN: one call may run a
few kernels) and copies; free ops (bitcasts, tuples, parameters) are not counted.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2cli import kernels, precision  # noqa: E402
from gpt2cli.config import preset  # noqa: E402
from gpt2cli.engine import DecodeState, SamplingParams, _programs  # noqa: E402
from gpt2cli.model import KVCache, init_params  # noqa: E402
from gpt2cli.training.plan import train_config_for  # noqa: E402
from gpt2cli.training.trainer import Trainer, TrainState  # noqa: E402

# An H100 SXM as XLA describes it (device_description.proto); the H200 differs in memory only.
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
DECODES = (("bfloat16", 1), ("float32", 1), ("bfloat16", 8), ("bfloat16", 64))
TRAINS = ("bfloat16", "tf32", "float32")


class Target:
    """Where programs are compiled: an H100 without a GPU ("cuda"), or this machine ("cpu")."""

    def __init__(self, platform: str):
        self.backend = "gpu" if platform == "cuda" else "cpu"
        self.sharding = None
        if platform == "cuda":
            from jax.experimental import topologies

            topology = topologies.get_topology_desc(
                platform="cuda", target_config=H100, topology="1x1x1"
            )
            mesh = topologies.make_mesh(topology, (1,), ("x",))
            self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def abstract(self, tree):
        """Shapes and dtypes of a tree of arrays (or of abstract values), placed on the target."""
        leaf = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.sharding)  # noqa: E731
        return jax.tree.map(leaf, tree)


def computations(hlo: str) -> dict[str, list[str]]:
    """The optimized program's computations: name -> instruction lines."""
    found, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if head:
            name = "ENTRY" if line.startswith("ENTRY") else head.group(1)
            found[name] = []
        elif line.startswith("}"):
            name = None
        elif name and line.strip().startswith(("%", "ROOT")):
            found[name].append(re.sub(r", metadata=\{[^}]*\}", "", line.strip()))
    return found


def thunks(lines: list[str]) -> collections.Counter:
    """What each instruction of one computation launches, by kind."""
    kinds = collections.Counter()
    for line in lines:
        op = _opcode(line)
        if op in FREE_OPS:
            continue
        if op == "fusion":
            custom = re.search(r'"kind":"(\w+)"', line)
            op = "fusion:" + (custom.group(1) if custom else re.search(r"kind=(\w+)", line)[1])
        elif op == "custom-call":
            op = re.search(r'custom_call_target="([^"]+)"', line).group(1)
        kinds[op] += 1
    return kinds


def step_loop(program: dict[str, list[str]]) -> tuple[collections.Counter, bool]:
    """The loop that runs one token per iteration (the one with the most work in its body):
    its kernels by kind, and whether its trip count is known (else XLA:GPU reads the condition
    back to the host after every iteration)."""
    loops = [line for lines in program.values() for line in lines if " while(" in line]
    bodies = [thunks(program[re.search(r"body=%([\w.\-]+)", w)[1]]) for w in loops]
    most = max(range(len(loops)), key=lambda i: sum(bodies[i].values()))
    return bodies[most], '"known_trip_count"' in loops[most]


def decode_counts(target: Target, config, dtype: str, rows: int) -> dict:
    chosen = kernels.choose(precision.get(dtype), batch=rows, backend=target.backend)
    programs = _programs(config, dtype, chosen, 32)
    params = jax.eval_shape(lambda: jax.tree.map(lambda a: a.astype(dtype), init_params(config)))
    if chosen.out_in:
        params = jax.tree_util.tree_map_with_path(
            lambda p, a: (
                jax.ShapeDtypeStruct(a.shape[::-1], a.dtype) if p[-1].key == "kernel" else a
            ),
            params,
        )
    length = min(512, config.n_positions)
    state = jax.eval_shape(
        lambda: DecodeState(
            cache=KVCache.empty(
                config, chosen.cache_rows(rows), length, chosen.cache_dtype(jnp.dtype(dtype))
            ),
            token=jnp.zeros((rows,), jnp.int32),
            position=jnp.zeros((rows,), jnp.int32),
            seen=None,
            keys=jax.vmap(jax.random.key)(jnp.zeros((rows,), jnp.uint32)),
            step=jnp.zeros((), jnp.int32),
        )
    )
    params, state, rule = target.abstract(params), target.abstract(state), SamplingParams().rule
    count = target.abstract(jax.ShapeDtypeStruct((), jnp.int32))
    record = {"job": "decode", "dtype": dtype, "rows": rows, "cache": length}
    for name, lowered in (
        ("chunk", programs.decode.lower(params, state, rule=rule)),
        ("whole", programs.decode_run.lower(params, state, count, rule=rule, length=256)),
    ):
        body, known = step_loop(computations(lowered.compile().as_text()))
        record[f"{name}_kernels_per_token"] = sum(body.values())
        record[f"{name}_host_waits_per_token"] = not known
        record[f"{name}_by_kind"] = dict(body.most_common())
    return record


def train_counts(target: Target, config, dtype: str, batch: int, seq: int) -> dict:
    tc = train_config_for(config, batch_size=batch, seq_length=seq, dtype=dtype, dropout=0.0)
    trainer = Trainer(config, tc)
    trainer.kernels = kernels.choose(precision.get(dtype), backend=target.backend)
    params = jax.eval_shape(lambda: init_params(trainer.model_config))
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=trainer.opt_state_template(params),
    )
    tokens = jax.ShapeDtypeStruct((1, batch, seq + 1), jnp.int32)
    step = trainer.kernels.jit(trainer._train_step)
    hlo = step.lower(target.abstract(state), target.abstract(tokens)).compile().as_text()
    program = computations(hlo)
    entry = thunks(program["ENTRY"])
    launched = [line for line in program["ENTRY"] if _opcode(line) not in FREE_OPS]
    written = [_results(line)[0] for line in launched]  # each kernel's first result
    logits = [b for n, b in written if n >= batch * seq * config.vocab_size]
    scores = [b for n, b in written if n == batch * config.n_head * seq * seq]
    size = {_name(line): _bytes(line) for line in program["ENTRY"]}
    read = sum(size.get(a, 0) for line in launched for a in _operands(line))
    return {
        "job": "train",
        "dtype": dtype,
        "batch": f"{batch}x{seq}",
        "kernels_per_step": sum(entry.values()),
        "logits_passes": len(logits),
        "scores_written": len(scores),  # [B, H, T, T] arrays
        "scores_gb": round(sum(scores) / 1e9, 1),
        # every kernel's results, and its operands (each read counted once per kernel)
        "gb_written": round(sum(_bytes(line) for line in launched) / 1e9, 1),
        "gb_read": round(read / 1e9, 1),
        "by_kind": dict(entry.most_common()),
    }


BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4}


def _opcode(line: str) -> str:
    op = re.search(r"= (?:\(.*?\)|\S+) ([\w-]+)\(", line)
    return op.group(1) if op else "?"


def _name(line: str) -> str:
    return line.removeprefix("ROOT ").split(" = ")[0]


def _operands(line: str) -> list[str]:
    args = line.split(f" {_opcode(line)}(", 1)[1].split(")", 1)[0]
    return [a.strip() for a in args.split(",")]


def _results(line: str) -> list[tuple[int, int]]:
    """Elements and bytes of each of an instruction's results (a tuple has several)."""
    head = line.split(" = ", 1)[1].split(f" {_opcode(line)}(", 1)[0]
    found = []
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", head):
        elements = math.prod(int(d) for d in dims.split(",") if d)
        found.append((elements, elements * BYTES.get(dtype, 4)))
    return found


def _bytes(line: str) -> int:
    return sum(size for _, size in _results(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--platform", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", default="gpt2", help="a preset (default: GPT-2 124M)")
    parser.add_argument("--only", default="decode,train", help="decode, train or both")
    parser.add_argument("--batch", type=int, default=16, help="training rows")
    parser.add_argument("--seq", type=int, default=1024, help="training sequence length")
    args = parser.parse_args()
    target, config = Target(args.platform), preset(args.model)
    seq = min(args.seq, config.n_positions)
    records = []
    if "decode" in args.only:
        records += [decode_counts(target, config, d, rows) for d, rows in DECODES]
    if "train" in args.only:
        records += [train_counts(target, config, d, args.batch, seq) for d in TRAINS]
    for record in records:
        print(json.dumps(record), flush=True)
    print(f"\n{args.model} on {args.platform}: kernels XLA launches", file=sys.stderr)
    for r in records:
        if r["job"] == "decode":
            waits = " (host waits per token)" if r["whole_host_waits_per_token"] else ""
            print(
                f"  decode {r['dtype']:>8} b{r['rows']:<3} per token: chunked "
                f"{r['chunk_kernels_per_token']}, whole run {r['whole_kernels_per_token']}{waits}",
                file=sys.stderr,
            )
        else:
            print(
                f"  train  {r['dtype']:>8} {r['batch']} per step: {r['kernels_per_step']}, "
                f"{r['logits_passes']} [B, T, V] arrays written, {r['scores_written']} [B, H, T, T] "
                f"arrays written ({r['scores_gb']} GB); {r['gb_written']} GB written, "
                f"{r['gb_read']} GB read",
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()
