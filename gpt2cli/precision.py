"""What `--dtype` means: one table for every command and the Python API.

A precision names the dtype that activations (and an engine's weights) are computed in, and the
precision of every matrix product. `float32` asks for true float32 products on every backend:
XLA would otherwise use TensorFloat-32 for float32 products on recent NVIDIA GPUs, and logits
would drift ~1e-3 from transformers'. `tf32` is that faster mode, asked for by name. On a CPU,
`tf32` computes exactly as `float32`.

This module imports no JAX, so the CLI can list and check dtypes before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt2cli.errors import ParameterError


@dataclass(frozen=True)
class Precision:
    name: str
    compute: str  # dtype of activations; an engine also keeps its weights in it
    products: str  # jax.lax.Precision of every matrix product
    summary: str


PRECISIONS = {
    p.name: p
    for p in (
        Precision("float32", "float32", "highest", "float32 products on every backend"),
        Precision("tf32", "float32", "default", "float32 weights, TensorFloat-32 products on GPUs"),
        Precision("bfloat16", "bfloat16", "default", "bfloat16, products summed in float32"),
    )
}
NAMES = tuple(PRECISIONS)
HELP = (
    "Precision: float32 (exact products everywhere), tf32 (TensorFloat-32 products on "
    "NVIDIA GPUs, faster, ~1e-3 off) or bfloat16."
)


def get(name: str) -> Precision:
    """The precision called `name`; the one check of a dtype, naming the choices."""
    try:
        return PRECISIONS[name]
    except (KeyError, TypeError):
        raise ParameterError("dtype", f"must be one of {', '.join(NAMES)}, got {name!r}") from None
