"""What a training run will hold in memory, estimated from shapes, against what the device has.

The estimate counts float32 master weights, AdamW's two moments, the gradients (and their
accumulator), and the activations one micro-batch keeps for the backward pass, per layer after
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"):
34·T·D + 5·H·T² values per sequence, stored at the compute dtype; with rematerialisation only
each block's input is kept, plus one block's worth while it is recomputed; and the float32
logits with their gradient, one slice of the sequence at a time when the loss is chunked. It leaves out XLA's
workspace and fragmentation, so it is a floor: a run above the device's memory cannot fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gpt2cli.config import GPT2Config
from gpt2cli.errors import UserError

GB = 1e9


@dataclass(frozen=True)
class Footprint:
    params: int
    optimizer: int
    gradients: int
    activations: int
    rows: int  # sequences per micro-batch on one device
    seq: int

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations

    def describe(self) -> str:
        return (
            f"{self.total / GB:.2f} GB (weights {self.params / GB:.2f}, optimizer "
            f"{self.optimizer / GB:.2f}, gradients {self.gradients / GB:.2f}, activations "
            f"{self.activations / GB:.2f} at {self.rows} x {self.seq} tokens per device)"
        )


def footprint(
    config: GPT2Config,
    *,
    rows: int,
    seq: int,
    compute_bytes: int,
    grad_accum: int = 1,
    remat: bool = False,
    shards: int = 1,
    loss_chunks: int = 1,
) -> Footprint:
    """Bytes one device holds; `rows` per device, `shards`: devices sharing params (FSDP),
    `loss_chunks`: sequence slices the LM head and loss run over (train.token_loss)."""
    n = config.num_params()
    params = 4 * n // shards
    gradients = params * (2 if grad_accum > 1 else 1)  # a micro-batch's and the running sum
    d, h, layers = config.n_embd, config.n_head, config.n_layer
    per_layer = (
        rows * seq * (34 * d + 5 * h * seq) * compute_bytes // 2
    )  # the paper counts 2-byte values
    kept = rows * seq * d * compute_bytes * layers + per_layer if remat else per_layer * layers
    logits = rows * seq * config.vocab_size * 4 * 2 // loss_chunks  # float32, and their gradient
    return Footprint(params, 2 * params, gradients, kept + logits, rows, seq)


MACHINE_MEMORY = "GPT2_MACHINE_MEMORY"  # bytes the checks take as the machine's (tests, a share)


def largest_part(config: GPT2Config) -> str:
    """Which of a model's parts holds most of its parameters, and the setting that sizes it."""
    d = config.n_embd
    parts = {
        f"the position table (n_positions {config.n_positions} x n_embd {d}) holds most of "
        "them: a smaller --n-positions": config.n_positions * d,
        f"the token table (vocab_size {config.vocab_size} x n_embd {d}) holds most of them: "
        "a smaller vocab_size": config.vocab_size * d,
        f"the {config.n_layer} blocks hold most of them: a smaller --n-layer or --n-embd": (
            config.num_params() - (config.n_positions + config.vocab_size) * d
        ),
    }
    return max(parts, key=parts.get)


def host_available() -> int | None:
    """Memory the host can still give (MemAvailable, or less where this process's address
    space is limited), or None where it cannot be read. GPT2_MACHINE_MEMORY overrides it."""
    if os.environ.get(MACHINE_MEMORY):
        return int(float(os.environ[MACHINE_MEMORY]))
    available = _mem_available()
    limit = _address_space_limit()
    return limit if available is None else min(available, limit or available)


def _address_space_limit() -> int | None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def device_capacity() -> tuple[int | None, str]:
    """(bytes, what) of the first local device: an accelerator's limit, else the host's RAM."""
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit") and not os.environ.get(MACHINE_MEMORY):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    return host_available(), "available host memory"


# ---- the other commands: what generating and scoring hold ----------------------------------


def generation_footprint(
    config: GPT2Config,
    *,
    rows: int,
    length: int,
    prompt: int,
    compute_bytes: int,
    prefill_rows=None,
) -> int:
    """Bytes a generating command holds (a floor): the float32 weights twice (host and device),
    the KV cache of `rows` x `length` slots at the compute dtype, the float32 attention scores
    of a prefill of `prompt` tokens over `prefill_rows` rows (default: all), and each row's
    float32 logits with their sampling copy."""
    prefill_rows = rows if prefill_rows is None else prefill_rows
    weights = 2 * 4 * config.num_params()
    cache = 2 * config.n_layer * rows * length * config.n_embd * compute_bytes
    scores = prefill_rows * config.n_head * prompt * length * 4
    logits = 2 * rows * config.vocab_size * 4
    return weights + cache + scores + logits


def scoring_footprint(config: GPT2Config, *, rows: int, length: int, compute_bytes: int) -> int:
    """Bytes a scoring command (eval) holds (a floor): the float32 weights twice, one layer's
    activations and attention scores of `rows` x `length` tokens, and their float32 logits."""
    weights = 2 * 4 * config.num_params()
    layer = rows * length * 16 * config.n_embd * compute_bytes
    scores = rows * config.n_head * length * length * 4
    logits = rows * length * config.vocab_size * 4
    return weights + layer + scores + logits


def compute_bytes(dtype: str) -> int:
    """Bytes per activation at a precision's compute dtype."""
    import jax.numpy as jnp

    from gpt2cli import precision

    return jnp.dtype(precision.get(dtype).compute).itemsize


def check_fits(need: int, what: str, lower: str) -> None:
    """Refuse, in one line naming what to lower, a command whose `need` (bytes) is above what
    the device (or the host) has; before anything that size is allocated."""
    have, where = device_capacity()
    if have is not None and need > have:
        raise UserError(
            f"{what} needs at least {need / GB:.1f} GB but this machine has "
            f"{have / GB:.1f} GB ({where}): lower {lower}"
        )
