"""LoRA (Hu et al. 2021, "Low-Rank Adaptation"): a frozen Dense kernel W [in, out] plus a
trained low-rank update, `x @ W + scale * dropout(x) @ A @ B`, A [in, r], B [r, out],
scale = alpha / r. A starts as PEFT's (Kaiming-uniform, bound 1/sqrt(in)) and B at zero, so a
fresh adapter changes nothing.

Adapters are a tree shaped like the params, holding `{"lora_a", "lora_b"}` where the params
hold a Dense's `{"kernel", "bias"}`: `h_0/attn/c_attn/lora_a`. A and B are stored in the
Dense kernel's (in, out) orientation; PEFT stores them transposed (adapter.py converts).

Training runs the adapters through the model (`attach`: model.py's Dense adds them); inference
merges them into the kernels once (`merge`), which costs nothing per token afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpt2cli.checkpoint import unflatten
from gpt2cli.config import GPT2Config
from gpt2cli.errors import ParameterError

# The Dense layers of a block that an adapter can target, as (module, layer) in the params
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
DEFAULT_TARGETS = ("attn.c_attn",)  # PEFT's default for GPT-2
_SHORT = {
    "c_attn": ("attn.c_attn",),
    "c_fc": ("mlp.c_fc",),
    "c_proj": ("attn.c_proj", "mlp.c_proj"),
}


@dataclass(frozen=True)
class LoraSpec:
    """An adapter's shape and how it is applied (hashable: part of a trainer's identity)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ParameterError("lora_rank", f"must be a positive integer, got {self.rank}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ParameterError("lora_alpha", f"must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ParameterError("lora_dropout", f"must be in [0, 1), got {self.dropout}")
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise ParameterError("lora_targets", f"must name layers of {TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check_fits(self, config: GPT2Config) -> None:
        """A rank no wider than the narrowest side of every adapted layer."""
        for target in self.targets:
            width = min(layer_shape(config, target))
            if self.rank > width:
                raise ParameterError(
                    "lora_rank",
                    f"{self.rank} is wider than {target} ({width}); use at most {width}",
                )


def parse_targets(names: Iterable[str]) -> tuple[str, ...]:
    """Layer names as given (`attn.c_attn`, or PEFT's short `c_attn`, `c_fc`, `c_proj` (both
    projections)) -> TARGETS' names, in TARGETS' order."""
    chosen: set[str] = set()
    for name in names:
        for part in str(name).split(","):
            part = part.strip()
            found = (part,) if part in TARGETS else _SHORT.get(part)
            if found is None:
                raise ParameterError(
                    "lora_targets",
                    f"{part!r} names no layer; choose from {', '.join(TARGETS)} "
                    "(or c_attn, c_fc, c_proj)",
                )
            chosen.update(found)
    if not chosen:
        raise ParameterError("lora_targets", "names no layer; give at least one")
    return tuple(t for t in TARGETS if t in chosen)


def layer_shape(config: GPT2Config, target: str) -> tuple[int, int]:
    """(in, out) of a targeted Dense kernel."""
    d, inner = config.n_embd, config.mlp_width
    return {
        "attn.c_attn": (d, 3 * d),
        "attn.c_proj": (d, d),
        "mlp.c_fc": (d, inner),
        "mlp.c_proj": (inner, d),
    }[target]


def adapter_shapes(config: GPT2Config, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """'h_0/attn/c_attn/lora_a' -> shape, for every adapter array."""
    shapes = {}
    for i in range(config.n_layer):
        for target in spec.targets:
            d_in, d_out = layer_shape(config, target)
            at = f"h_{i}/{target.replace('.', '/')}"
            shapes[f"{at}/lora_a"] = (d_in, spec.rank)
            shapes[f"{at}/lora_b"] = (spec.rank, d_out)
    return shapes


def init_adapters(config: GPT2Config, spec: LoraSpec, seed: int = 0) -> dict:
    """Fresh float32 adapters: A uniform in +-1/sqrt(in) (PEFT's Kaiming init), B zero."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in adapter_shapes(config, spec).items():
        if name.endswith("lora_a"):
            bound = 1.0 / math.sqrt(shape[0])
            flat[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            flat[name] = np.zeros(shape, np.float32)
    return unflatten(flat)


def attach(params: Any, adapters: Any, scale: float) -> Any:
    """The params with each adapter beside its kernel (B times scale), as model.py's Dense
    reads them while training. Pure: fine inside jit, and differentiable in `adapters`."""
    if "lora_a" in adapters:
        return {**params, "lora_a": adapters["lora_a"], "lora_b": adapters["lora_b"] * scale}
    return {k: attach(params[k], adapters[k], scale) if k in adapters else v
            for k, v in params.items()}  # fmt: skip


def merge(params: Any, adapters: Any, scale: float) -> Any:
    """Plain params: every adapted kernel W replaced by W + scale * A @ B, in W's dtype (the
    product and the sum in float64 on the host, or in W's dtype inside jit)."""
    if "lora_a" in adapters:
        kernel = params["kernel"]
        if isinstance(kernel, np.ndarray):
            a, b = (np.asarray(adapters[n], np.float64) for n in ("lora_a", "lora_b"))
            merged = (kernel.astype(np.float64) + scale * (a @ b)).astype(kernel.dtype)
        else:
            a, b = (adapters[n].astype(np.float32) for n in ("lora_a", "lora_b"))
            merged = (kernel.astype(np.float32) + scale * (a @ b)).astype(kernel.dtype)
        return {**params, "kernel": merged}
    return {k: merge(params[k], adapters[k], scale) if k in adapters else v
            for k, v in params.items()}  # fmt: skip


def count(spec: LoraSpec, config: GPT2Config) -> int:
    """Trained values of an adapter."""
    return sum(math.prod(s) for s in adapter_shapes(config, spec).values())
