"""Named points inside the model, where a run can read activations or replace them.

model.py passes every activation that TransformerLens names through `point(name, x)`. Outside
`recording(...)` a point returns x itself and adds nothing to the traced program, so the
engine's and the trainer's compiled programs are exactly what they were without points. Inside,
the hooks for that name run in order (each a pure function `(activation, name) -> activation`),
and the names asked for are recorded, after their hooks, into the cache that `recording` yields.

The names, in the order the forward pass reaches them (B batch, T tokens, D n_embd, H heads,
K head_dim, I MLP width; float32 where marked, else the compute dtype):

    embed, pos_embed                                    [B, T, D]
    blocks.{i}.resid_pre, blocks.{i}.ln1.normalized     [B, T, D]
    blocks.{i}.attn.q, .k, .v                           [B, T, H, K]
    blocks.{i}.attn.scores                              [B, H, T, T] float32, -inf where masked
    blocks.{i}.attn.pattern                             [B, H, T, T] float32 (rows sum to 1)
    blocks.{i}.attn.z                                   [B, T, H, K] (the heads' mixed values)
    blocks.{i}.attn.out, .resid_mid, .ln2.normalized    [B, T, D]
    blocks.{i}.mlp.pre, .mlp.post                       [B, T, I] (before, after the activation)
    blocks.{i}.mlp.out, .resid_post                     [B, T, D]
    ln_final.normalized                                 [B, T, D]
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import jax

from gpt2cli.errors import UserError

Hook = Callable[[jax.Array, str], jax.Array]

_BLOCK_POINTS = (
    "resid_pre",
    "ln1.normalized",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.scores",
    "attn.pattern",
    "attn.z",
    "attn.out",
    "resid_mid",
    "ln2.normalized",
    "mlp.pre",
    "mlp.post",
    "mlp.out",
    "resid_post",
)


def names(n_layer: int) -> tuple[str, ...]:
    """Every point of a model with `n_layer` blocks, in the order the forward pass reaches them."""
    blocks = (f"blocks.{i}.{point}" for i in range(n_layer) for point in _BLOCK_POINTS)
    return ("embed", "pos_embed", *blocks, "ln_final.normalized")


def select(patterns: Sequence[str], n_layer: int, what: str = "names") -> tuple[str, ...]:
    """The points that names or fnmatch globs select, in forward order.

    A pattern that selects nothing is a UserError naming the closest valid names.
    """
    valid = names(n_layer)
    chosen = set()
    for pattern in patterns:
        matched = fnmatch.filter(valid, pattern)
        if not matched:
            close = difflib.get_close_matches(pattern, valid, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise UserError(
                f"{what}: {pattern!r} names no hook point of this {n_layer}-layer model{hint} "
                "(gpt2cli.hooks.names lists them)"
            )
        chosen.update(matched)
    return tuple(name for name in valid if name in chosen)


@dataclass
class _Run:
    keep: frozenset[str]
    hooks: Mapping[str, Sequence[Hook]]
    cache: dict[str, jax.Array] = field(default_factory=dict)


_ACTIVE: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("hooks", default=None)


@contextlib.contextmanager
def recording(
    keep: Sequence[str] = (), hooks: Mapping[str, Sequence[Hook]] | None = None
) -> Iterator[dict[str, jax.Array]]:
    """Trace the model with these hooks (exact names -> hooks in order) inside this block, and
    yield the cache that fills with the `keep` names' activations as the trace reaches them."""
    run = _Run(frozenset(keep), hooks or {})
    token = _ACTIVE.set(run)
    try:
        yield run.cache
    finally:
        _ACTIVE.reset(token)


def point(name: str, x: jax.Array) -> jax.Array:
    """x as the hooks of `name` leave it (x itself outside `recording`)."""
    run = _ACTIVE.get()
    if run is None:
        return x
    for hook in run.hooks.get(name, ()):
        x = hook(x, name)
    if name in run.keep:
        run.cache[name] = x
    return x


def wanted(*points: str) -> bool:
    """Whether the enclosing `recording` reads or hooks any of these points: the attention
    forms its [B, H, T, T] pattern only then (the kernels never need it whole)."""
    run = _ACTIVE.get()
    return run is not None and any(p in run.keep or p in run.hooks for p in points)
