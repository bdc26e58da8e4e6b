"""Look inside GPT-2: read and change its named activations, the logit lens, attention maps.

    logits, cache = run_with_cache(config, params, ids, names=["blocks.*.resid_post"])
    logits = run_with_hooks(config, params, ids, hooks={"blocks.9.attn.z": zero_head(9, 6)})

The names are TransformerLens's (hooks.py lists them with their shapes) and the model is
model.py's own, run through its hook points. A hook is a pure function `(activation, name) ->
activation`; names and hook keys may be fnmatch globs, and several hooks on one point run in the
order given. Runs are jitted: one program per model, precision, set of names and set of hooks.
Hooks are part of that key, so they must be hashable: a function (by identity) or one of the
dataclasses below, whose arrays are passed to the program rather than built into it (a new mean,
source or vector of the same shape reuses the compiled program).

No terminal here: `gpt2 lens` (cli/lens_cmd.py) prints what these functions return.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gpt2cli import hooks, kernels, precision
from gpt2cli.api import checked_ids
from gpt2cli.atomic import atomic_write
from gpt2cli.config import GPT2Config
from gpt2cli.errors import UserError
from gpt2cli.hooks import Hook
from gpt2cli.model import GPT2

Hooks = Mapping[str, Hook | Sequence[Hook]]


# ---- running with names and hooks ------------------------------------------------------


def run_with_cache(
    config: GPT2Config,
    params,
    input_ids,
    *,
    names: Sequence[str] | None = None,
    hooks: Hooks | None = None,
    dtype: str = "float32",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [B, T, V] (float32) and the activations of `names` (names or globs; None: every
    point), recorded after any `hooks` ran on them. Only the names asked for are kept."""
    keep = _names(config, ["*"] if names is None else names)
    return _run(config, params, input_ids, keep, hooks or {}, dtype)


def run_with_hooks(
    config: GPT2Config, params, input_ids, *, hooks: Hooks, dtype: str = "float32"
) -> jax.Array:
    """Logits [B, T, V] (float32) with `hooks` (name or glob -> a hook or a list of hooks)
    changing the activations they name. Hooks that return their input leave the logits
    bit-identical to gpt2cli.logits."""
    return _run(config, params, input_ids, (), hooks, dtype)[0]


def _names(config: GPT2Config, names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):  # one name, not its letters
        names = [names]
    return hooks.select(names, config.n_layer, "names")


@dataclass(frozen=True)
class _Plan:
    """What a program is compiled for, apart from shapes: the names kept and the hooks' static
    part (their tree and every leaf that is not an array); their arrays are arguments."""

    keep: tuple[str, ...]
    counts: tuple[tuple[str, int], ...]  # (point, how many hooks run there), in forward order
    tree: Any  # jax PyTreeDef of the hooks in that order
    static: tuple  # the tree's leaves, None where an array goes

    @classmethod
    def of(cls, keep, table: dict[str, list[Hook]]) -> tuple[_Plan, list[jax.Array]]:
        leaves, tree = jax.tree_util.tree_flatten([h for hs in table.values() for h in hs])
        arrays = [leaf for leaf in leaves if _is_array(leaf)]
        static = tuple(None if _is_array(leaf) else leaf for leaf in leaves)
        try:
            hash(static)
        except TypeError as exc:
            raise UserError(
                f"hooks must be hashable (a function, or a frozen dataclass): {exc}"
            ) from None
        counts = tuple((name, len(hs)) for name, hs in table.items())
        return cls(tuple(keep), counts, tree, static), arrays

    def hooks(self, arrays: list[jax.Array]) -> dict[str, list[Hook]]:
        given = iter(arrays)
        leaves = [next(given) if leaf is None else leaf for leaf in self.static]
        flat = iter(jax.tree_util.tree_unflatten(self.tree, leaves))
        return {name: [next(flat) for _ in range(count)] for name, count in self.counts}


def _is_array(leaf) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray)


def _table(config: GPT2Config, given: Hooks) -> dict[str, list[Hook]]:
    """Exact point -> its hooks, points in forward order, each point's hooks in the order given."""
    table: dict[str, list[Hook]] = {}
    for pattern, value in given.items():
        fns = list(value) if isinstance(value, list | tuple) else [value]
        if not all(callable(fn) for fn in fns):
            raise UserError(f"hooks[{pattern!r}] must be a function (activation, name) or a list")
        for name in hooks.select([pattern], config.n_layer, "hooks"):
            table.setdefault(name, []).extend(fns)
    order = hooks.names(config.n_layer)
    return {name: table[name] for name in order if name in table}


def _run(config, params, input_ids, keep, given: Hooks, dtype: str):
    ids = jnp.asarray(checked_ids(config, input_ids), jnp.int32)
    plan, arrays = _Plan.of(keep, _table(config, given))
    logits, cache = _program(config, dtype)(params, ids, arrays, plan)
    return logits, {name: cache[name] for name in keep}  # in forward order


@functools.lru_cache(maxsize=8)
def _program(config: GPT2Config, dtype: str):
    """The model of this config and precision, run with a plan's names and hooks (jitted; one
    compiled program per plan and shapes)."""
    policy = precision.get(dtype)
    model = GPT2(config, dtype=jnp.dtype(policy.compute))
    chosen = kernels.choose(policy)

    def run(params, ids, arrays, plan: _Plan):
        with kernels.use(chosen), hooks.recording(plan.keep, plan.hooks(arrays)) as cache:
            logits = model.apply({"params": params}, ids)[0]
        return logits, cache

    return chosen.jit(run, static_argnums=3)


# ---- interventions ----------------------------------------------------------------------


def _expect(name: str, point: str, what: str) -> None:
    if name != point:
        raise UserError(f"{what} changes {point}, but was hooked on {name}")


@struct.dataclass
class ZeroHead:
    """Zero one head's output (its slice of `blocks.{layer}.attn.z`): zero ablation."""

    layer: int = struct.field(pytree_node=False)
    head: int = struct.field(pytree_node=False)

    def __call__(self, z: jax.Array, name: str) -> jax.Array:
        _expect(name, f"blocks.{self.layer}.attn.z", f"zero_head({self.layer}, {self.head})")
        return z.at[:, :, _head(self.head, z)].set(0)  # [B, T, H, K]


@struct.dataclass
class MeanHead:
    """Replace one head's output by a mean output [K] (from `mean_head`): mean ablation."""

    layer: int = struct.field(pytree_node=False)
    head: int = struct.field(pytree_node=False)
    mean: jax.Array  # [K]

    def __call__(self, z: jax.Array, name: str) -> jax.Array:
        _expect(name, f"blocks.{self.layer}.attn.z", f"mean_head({self.layer}, {self.head})")
        return z.at[:, :, _head(self.head, z)].set(self.mean.astype(z.dtype))  # [B, T, H, K]


def _head(head: int, z: jax.Array) -> int:
    if not 0 <= head < z.shape[2]:
        raise UserError(f"head must lie in [0, {z.shape[2]}), got {head}")
    return head


def zero_head(layer: int, head: int) -> ZeroHead:
    """The hook for `blocks.{layer}.attn.z` that zero-ablates `head`."""
    return ZeroHead(layer, head)


def mean_head(layer: int, head: int, z) -> MeanHead:
    """The hook for `blocks.{layer}.attn.z` that replaces `head`'s output by its mean over the
    batch and positions of `z` [B, T, H, K] (that point's activation on reference prompts)."""
    z = jnp.asarray(z)
    if z.ndim != 4:
        raise UserError(f"z must be blocks.{layer}.attn.z shaped [B, T, H, K], got {z.shape}")
    return MeanHead(layer, head, jnp.mean(z[:, :, _head(head, z)], axis=(0, 1)))


@struct.dataclass
class Patch:
    """Replace an activation by another prompt's (`source`, same shape) at the positions where
    `where` [T] is true (the attention's scores and pattern: at every position only)."""

    source: jax.Array  # [B, T, ...]
    where: jax.Array  # [T] bool
    everywhere: bool = struct.field(pytree_node=False)

    def __call__(self, x: jax.Array, name: str) -> jax.Array:
        if self.source.shape != x.shape:
            raise UserError(
                f"cannot patch {name} shaped {x.shape} from an activation shaped "
                f"{self.source.shape} (the prompts must have the same length)"
            )
        if self.everywhere:
            return self.source.astype(x.dtype)
        if name.endswith(("attn.scores", "attn.pattern")):  # [B, H, T, T]: no position axis
            raise UserError(f"patch {name} at every position (positions=None) or patch attn.z")
        where = self.where.reshape((-1,) + (1,) * (x.ndim - 2))  # [T, 1, ...]
        return jnp.where(where, self.source.astype(x.dtype), x)


def patch(source, positions: Sequence[int] | None = None) -> Patch:
    """The hook that patches in `source` (the same point's activation [B, T, ...] from another
    prompt of the same length, e.g. from run_with_cache) at `positions` (None: all of them)."""
    source = jnp.asarray(source)
    if source.ndim < 2:
        raise UserError(f"source must be an activation shaped [B, T, ...], got {source.shape}")
    length = source.shape[1]
    where = np.zeros(length, bool)
    for p in range(length) if positions is None else positions:
        if not -length <= p < length:
            raise UserError(f"position {p} is outside the source's {length} positions")
        where[p] = True
    return Patch(source, jnp.asarray(where), positions is None)


def patch_sweep(
    config: GPT2Config,
    params,
    input_ids,
    source: Mapping[str, jax.Array],
    point: str = "resid_pre",
    *,
    dtype: str = "float32",
) -> np.ndarray:
    """Activation patching over layers and positions in one call: for each layer l and position
    t, the last position's logits when `blocks.{l}.{point}` at t is patched in from `source`
    (the cache of a run_with_cache on another prompt of the same length, naming that point).

    Returns float32 [L, T, B, V]. Every run shares one compiled program (the patches differ in
    their arrays only).
    """
    points = [f"blocks.{layer}.{point}" for layer in range(config.n_layer)]
    missing = [name for name in points if name not in source]
    if missing:
        raise UserError(f"source lacks {missing[0]}: run_with_cache the other prompt with it")
    length = checked_ids(config, input_ids).shape[1]
    out = []
    for layer in range(config.n_layer):
        rows = []
        for t in range(length):
            sweep = {
                name: patch(source[name], [t] if i == layer else [])
                for i, name in enumerate(points)
            }
            logits = run_with_hooks(config, params, input_ids, hooks=sweep, dtype=dtype)
            rows.append(np.asarray(logits[:, -1]))
        out.append(rows)
    return np.asarray(out, np.float32)


@struct.dataclass
class AddVector:
    """Add `scale` x `vector` [D] to a residual stream at every position (activation addition)."""

    vector: jax.Array  # [D]
    scale: jax.Array  # []

    def __call__(self, x: jax.Array, name: str) -> jax.Array:
        return x + (self.scale * self.vector).astype(x.dtype)


def add_vector(vector, scale: float = 1.0, n_embd: int | None = None) -> AddVector:
    """The hook that steers a residual stream (e.g. `blocks.6.resid_pre`) by `scale` x `vector`;
    with `n_embd`, a vector of another width is refused."""
    vector = np.asarray(vector)
    if n_embd is not None:
        check_vector(vector, n_embd)
    return AddVector(jnp.asarray(vector, jnp.float32), jnp.asarray(scale, jnp.float32))


# ---- the logit lens -----------------------------------------------------------------------


@dataclass(frozen=True)
class LogitLens:
    """The top tokens the final LayerNorm and the unembedding read off each residual stream."""

    names: tuple[str, ...]  # the stream of each row: blocks.0.resid_pre, then each resid_post
    ids: np.ndarray  # [R, B, T, k] token ids, likeliest first
    probs: np.ndarray  # [R, B, T, k] float32 probabilities


def lens_names(config: GPT2Config) -> tuple[str, ...]:
    """The residual streams the lens reads: before the first block, then after each block."""
    after = (f"blocks.{i}.resid_post" for i in range(config.n_layer))
    return ("blocks.0.resid_pre", *after)


def logit_lens(
    config: GPT2Config, params, input_ids, *, top_k: int = 5, dtype: str = "float32"
) -> LogitLens:
    """The plain logit lens: each residual stream through the final LayerNorm and the tied
    unembedding, as probabilities; the last row is the model's own next-token distribution."""
    if not 1 <= top_k <= config.vocab_size:
        raise UserError(f"top_k must lie in [1, {config.vocab_size}], got {top_k}")
    ids = jnp.asarray(checked_ids(config, input_ids), jnp.int32)
    top_probs, top_ids = _lens_program(config, dtype, top_k)(params, ids)
    return LogitLens(lens_names(config), np.asarray(top_ids), np.asarray(top_probs))


def lens_logits(config: GPT2Config, params, input_ids, *, dtype: str = "float32") -> jax.Array:
    """Every stream's full lens logits, float32 [R, B, T, V] (R = n_layer + 1)."""
    ids = jnp.asarray(checked_ids(config, input_ids), jnp.int32)
    return _lens_program(config, dtype, None)(params, ids)


@functools.lru_cache(maxsize=8)
def _lens_program(config: GPT2Config, dtype: str, top_k: int | None):
    policy = precision.get(dtype)
    compute = jnp.dtype(policy.compute)
    model = GPT2(config, dtype=compute)
    chosen = kernels.choose(policy)
    names = lens_names(config)

    def lens(params, ids):
        with kernels.use(chosen), hooks.recording(names) as cache:
            model.apply({"params": params}, ids, head=False)
            # stream by stream, so the last row is computed exactly as the model's logits are
            logits = jnp.stack([_unembed(config, params, cache[n], compute) for n in names])
        if top_k is None:
            return logits
        return jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)  # 2 x [R, B, T, k]

    return chosen.jit(lens)


def _unembed(config: GPT2Config, params, x: jax.Array, compute) -> jax.Array:
    """The model's last two steps (GPT2.__call__ after its blocks) on residual streams x [..., D]:
    the final LayerNorm with its weights, then the tied head -> float32 logits [..., V]."""
    norm = nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        dtype=compute,
        use_fast_variance=kernels.active().one_pass_variance(x),
    )
    x = norm.apply({"params": params["ln_f"]}, x)
    return kernels.active().head(x.astype(compute), params["wte"]["embedding"].astype(compute))


# ---- attention maps -----------------------------------------------------------------------


def attention_pattern(
    config: GPT2Config, params, input_ids, layer: int, head: int, *, dtype: str = "float32"
) -> np.ndarray:
    """One head's attention pattern [Tq, Tk] (float32, rows sum to 1) for one prompt [T]."""
    if not 0 <= layer < config.n_layer:
        raise UserError(f"layer must lie in [0, {config.n_layer}), got {layer}")
    if not 0 <= head < config.n_head:
        raise UserError(f"head must lie in [0, {config.n_head}), got {head}")
    name = f"blocks.{layer}.attn.pattern"
    _, cache = run_with_cache(config, params, input_ids, names=[name], dtype=dtype)
    return np.asarray(cache[name][0, head])


def save_heatmap(path: str | Path, pattern: np.ndarray, tokens: Sequence[str], title: str) -> None:
    """Write an attention pattern [Tq, Tk] as a PNG heatmap, tokens along both axes (needs
    matplotlib, the `plot` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    size = min(4 + 0.3 * len(tokens), 20)
    fig, ax = plt.subplots(figsize=(size, size), dpi=120)
    image = ax.imshow(pattern, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# ---- steering directions ------------------------------------------------------------------


def direction(
    config: GPT2Config, params, ids_a, ids_b, layer: int, *, dtype: str = "float32"
) -> np.ndarray:
    """An activation-addition vector float32 [D]: the mean over positions of prompt A's
    residual stream entering block `layer` (`blocks.{layer}.resid_pre`) minus prompt B's."""
    if not 0 <= layer < config.n_layer:
        raise UserError(f"layer must lie in [0, {config.n_layer}), got {layer}")
    name = f"blocks.{layer}.resid_pre"

    def mean_stream(ids) -> np.ndarray:
        _, cache = run_with_cache(config, params, ids, names=[name], dtype=dtype)
        return np.asarray(cache[name], np.float32).mean(axis=(0, 1))  # [D]

    return mean_stream(ids_a) - mean_stream(ids_b)


def check_vector(vector: np.ndarray, n_embd: int, source: str = "steering vector") -> None:
    """A UserError unless `vector` is a finite float vector of the residual stream's width."""
    if vector.ndim != 1 or vector.dtype.kind != "f":
        raise UserError(
            f"{source} must be a float vector [n_embd], got {vector.dtype} {vector.shape}"
        )
    if vector.shape[0] != n_embd:
        raise UserError(
            f"{source} has width {vector.shape[0]}, but this model's residual stream has "
            f"{n_embd}: make it with the same model"
        )
    if not np.isfinite(vector).all():
        raise UserError(f"{source} holds NaN or infinite values")


def save_vector(path: str | Path, vector: np.ndarray, *, force: bool = False) -> Path:
    """Write a steering vector as a .npy float32 [D] (not over an existing file unless `force`)."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} exists: pass force=True (--force) to overwrite it")
    vector = np.asarray(vector, np.float32)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npy"
            np.save(f, vector, allow_pickle=False)

    atomic_write(path, write)
    return path


def load_vector(path: str | Path, n_embd: int) -> np.ndarray:
    """A steering vector .npy [D] checked against the model's width (float32)."""
    path = Path(path)
    try:
        vector = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"steering vector {path} not found") from None
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} is not a .npy array: {exc}") from None
    check_vector(vector, n_embd, f"steering vector {path}")
    return vector.astype(np.float32)
