"""How GPT-2's pieces are computed on each backend: model.py says what, this module says how.

model.py asks `active()` for the kernels while it is traced. The engine and the trainer choose
a `Kernels` for their backend, precision and batch (`choose`) and trace inside `use(kernels)`;
outside any `use`, `choose()` for the default backend and float32 applies. So the same model
code runs the XLA:CPU workarounds on a CPU, fused attention on a GPU, and full float32 products
wherever float32 was asked for.

Shapes: N rows, B batch, T new tokens, S cache slots, H heads, K head_dim, V vocab.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gpt2cli.precision import PRECISIONS, Precision

LOWEST = float(jnp.finfo(jnp.float32).min)


@dataclass(frozen=True)
class Kernels:
    backend: str = "cpu"  # "cpu" turns on the XLA:CPU workarounds below
    products: str = "highest"  # jax.lax.Precision of every matrix product
    out_in: bool = False  # Dense kernels stored (out, in): float32 decoding on a CPU
    # "einsum": ours, below; "cudnn" (fused flash attention) or "xla": jax.nn.dot_product_attention
    attention_impl: str = "einsum"
    # With a cache, "last": attend to the cache as it was and the new tokens as two blocks of one
    # softmax, then write (XLA:CPU updates the cache in place only so); "first": write the new
    # keys and values, then one softmax over the whole cache (fewer kernels per step)
    cache_write: str = "last"
    # The head's table padded to a multiple of this many rows for large products: GEMM tiles
    # fit a vocabulary of 50304 better than one of 50257 (nanoGPT pads its vocabulary so)
    vocab_multiple: int = 1
    pad_one_row: bool = False  # a one-row product runs as two rows (see _in_out)
    # LayerNorm's variance around the mean in a second pass, not E[x^2] - E[x]^2, where there
    # are several rows (see one_pass_variance): XLA:GPU then normalizes them in one kernel, not
    # two, and so one decoded row runs twice (see cache_rows). Decoding only: training's
    # backward pass moves more bytes so.
    two_pass_variance: bool = False
    # XLA compiler options of every program traced with these kernels, as (name, value) pairs
    compile_options: tuple[tuple[str, str], ...] = ()

    def jit(self, fun: Callable, **jit_options) -> Callable:
        """jax.jit with these kernels' compiler options."""
        return jax.jit(fun, compiler_options=dict(self.compile_options) or None, **jit_options)

    # ---- weights ----------------------------------------------------------------------

    def kernel_shape(self, d_in: int, d_out: int) -> tuple[int, int]:
        return (d_out, d_in) if self.out_in else (d_in, d_out)

    def linear(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """x [..., in] times a Dense kernel -> [..., out], in x's dtype."""
        rows = x.reshape(-1, x.shape[-1])  # [N, in]: a 2-D dot, fast on XLA:CPU in bfloat16 too
        y = self._out_in(rows, kernel) if self.out_in else self._in_out(rows, kernel)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def head(self, x: jax.Array, table: jax.Array, keep_padding: bool = False) -> jax.Array:
        """Tied LM head: x [..., D] times the token table [V, D]^T -> float32 logits [..., V].

        `keep_padding` (a loss): where the table was padded, the logits keep its width, the
        padding's columns at LOWEST, so no softmax sees them. Cutting them off would cost the
        backward pass a pad of the [N, V] gradient (1.2 ms of a 124M bf16 step on an H200).
        """
        rows = x.reshape(-1, x.shape[-1])  # [N, D]
        vocab = table.shape[0]
        if self.backend == "cpu":
            y = self._out_in(rows, table)
        else:  # training's biggest product, and its gradients, stay in the compute dtype
            pad = -vocab % self.vocab_multiple if rows.shape[0] >= 256 else 0
            table = jnp.pad(table, ((0, pad), (0, 0)))  # [V + pad, D]; the pad is zeros
            y = jax.lax.dot_general(rows, table, (((1,), (1,)), ((), ())), self._precision)
            y = y if keep_padding else y[:, :vocab]
        logits = y.reshape(*x.shape[:-1], -1).astype(jnp.float32)  # [..., V or V + pad]
        if logits.shape[-1] > vocab:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, LOWEST)
        return logits

    def lookup(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        """Rows of an embedding table [N, D] at ids [...] -> [..., D]."""
        if self.backend == "cpu" and table.dtype == jnp.bfloat16:
            # XLA:CPU gathers bfloat16 through a float32 copy of the table. Fused with the
            # gather that costs nothing, but in a decode loop XLA would hoist the copy (~150 MB
            # for wte) out of the loop; tying the table to this step's ids keeps it inside.
            table, ids = jax.lax.optimization_barrier((table, ids))
        return jnp.take(table, ids, axis=0)

    def one_pass_variance(self, x: jax.Array) -> bool:
        """Whether LayerNorm sums x [..., D] and its squares in one pass. A single row does:
        XLA simplifies its norm to scalar sums, where the second pass is a third kernel."""
        return not self.two_pass_variance or x.size == x.shape[-1]

    def cache_rows(self, rows: int) -> int:
        """The KV cache's rows for decoding `rows` rows. With two-pass norms one row runs
        twice, over a cache of two rows: a single row's norm cannot fuse."""
        return 2 if rows == 1 and self.two_pass_variance else rows

    def cache_dtype(self, compute) -> jnp.dtype:
        # XLA:CPU would widen a bfloat16 cache to a float32 copy for the attention products at
        # every step, which costs more than the smaller cache saves; a GPU reads bfloat16 as is.
        return jnp.dtype(jnp.float32 if self.backend == "cpu" else compute)

    @property
    def _precision(self) -> jax.lax.Precision:
        return jax.lax.Precision(self.products)

    def _in_out(self, rows: jax.Array, kernel: jax.Array) -> jax.Array:
        """[N, in] x [in, out] -> [N, out].

        A single row is padded to two where a matrix product runs better than a vector's
        (`pad_one_row`): XLA:CPU's fast bfloat16 kernels (YNNPACK) take matrices only, and
        XLA:GPU turns a vector-matrix product into a multiply and a reduction, with the
        products in memory between them. The weights are still read once. On a GPU the row is
        repeated rather than padded with zeros: XLA fuses that broadcast into the product, where
        a pad would be a kernel of its own (one per layer and token).
        """
        dims = (((1,), (0,)), ((), ()))
        n = rows.shape[0]
        if n == 1 and self.pad_one_row:  # [2, in]
            if self.backend == "cpu":
                rows = jnp.pad(rows, ((0, 1), (0, 0)))
            else:
                rows = jnp.broadcast_to(rows, (2, rows.shape[1]))
        if self.backend == "cpu" and kernel.dtype == jnp.bfloat16:  # sums in float32: YNNPACK
            y = jax.lax.dot_general(rows, kernel, dims, self._precision, jnp.float32)
        else:
            y = jax.lax.dot_general(rows, kernel, dims, self._precision)
        return y[:n].astype(kernel.dtype)

    def _out_in(self, rows: jax.Array, kernel: jax.Array) -> jax.Array:
        """[N, in] x [out, in]^T -> [N, out].

        XLA:CPU runs a bfloat16 product against a transposed kernel many times slower than a
        float32 one. For one row a fused multiply-and-sum over float32-widened weights streams
        the bfloat16 weights instead; for several rows the float32 product over widened
        weights is faster.
        """
        dims = (((1,), (1,)), ((), ()))
        if kernel.dtype != jnp.bfloat16:
            return jax.lax.dot_general(rows, kernel, dims, self._precision)
        wide = jnp.float32
        if rows.shape[0] == 1:
            # XLA would rather widen the whole kernel to a float32 copy in memory (~150 MB for
            # the tied head) than inside the product: when another op reads the kernel too (the
            # head's embedding lookup), and in a decode loop, where the widening does not change
            # from step to step and is hoisted out. Tying the kernel to this row prevents both.
            kernel, rows = jax.lax.optimization_barrier((kernel, rows))
            y = jnp.sum(kernel.astype(wide) * rows.astype(wide), axis=-1)[None]  # [1, out]
        else:
            y = jax.lax.dot_general(rows.astype(wide), kernel.astype(wide), dims, self._precision)
        return y.astype(rows.dtype)

    # ---- attention -------------------------------------------------------------------

    def attention(
        self,
        q: jax.Array,  # [B, T, H, K] new queries, keys and values
        k: jax.Array,
        v: jax.Array,
        new_mask: jax.Array | None,  # [B, T] real new tokens; None: all real
        scale: float,
        drop: Callable[[jax.Array], jax.Array] | None,  # dropout of the probabilities
        past: tuple[jax.Array, jax.Array] | None = None,  # cached keys, values [B, H, S, K]
        past_ok: jax.Array | None = None,  # [B, S] cache slots to attend to
        index: jax.Array | None = None,  # [] the slot the new keys and values go to
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Causal attention of the new tokens over the cache as it was and themselves.

        Returns the output [B, T, H, K] and, with a cache, the cache with the new keys and
        values written at `index`.
        """
        if self.fused_applies(q, new_mask, drop, past):
            with jax.default_matmul_precision(self.products):  # its XLA form's products too
                out = jax.nn.dot_product_attention(
                    q, k, v, scale=scale, is_causal=True, implementation=self.attention_impl
                )
            return out, None
        if past is not None and self.cache_write == "first":
            return self._attention_after_write(q, k, v, new_mask, scale, drop, past, past_ok, index)
        return self._einsum_attention(q, k, v, new_mask, scale, drop, past, past_ok, index)

    def fused_applies(self, q, new_mask, drop, past) -> bool:
        """Whether jax.nn.dot_product_attention runs this call: training and scoring only
        (no cache, no padding, no attention dropout); cuDNN also wants half precision and a
        head size it has kernels for."""
        if self.attention_impl == "einsum" or past is not None:
            return False
        if new_mask is not None or drop is not None:
            return False
        head_dim = q.shape[-1]
        cudnn_fits = (
            q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
        )
        return self.attention_impl == "xla" or cudnn_fits

    def _einsum_attention(self, q, k, v, new_mask, scale, drop, past, past_ok, index):
        B, T, H, K = q.shape
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, T, K]
        einsum = _einsum(self._precision)
        # The new tokens (causally) and the cache as it was before this call are two blocks of
        # one softmax. Reading the updated cache instead would make XLA copy it.
        allowed = jnp.tril(jnp.ones((T, T), jnp.bool_))[None]  # [1, T, U]
        if new_mask is not None:
            allowed = allowed & new_mask[:, None, :].astype(jnp.bool_)  # [B, T, U]
        s_new = einsum("bhtk,bhuk->bhtu", q, k).astype(jnp.float32) * scale
        s_new = jnp.where(allowed[:, None], s_new, LOWEST)  # [B, H, T, U]
        # The max subtracted before the exps takes no gradient: any shift leaves a softmax as
        # it is, and differentiating a max compares every score with it ([B, H, T, T] booleans
        # written and read back).
        top = jnp.max(jax.lax.stop_gradient(s_new), axis=-1, keepdims=True)  # [B, H, T, 1]
        if past is not None:
            past_k, past_v = past  # [B, H, S, K] each
            s_past = einsum("bhtk,bhsk->bhts", q.astype(past_k.dtype), past_k)
            s_past = s_past.astype(jnp.float32) * scale
            s_past = jnp.where(past_ok[:, None, None, :], s_past, LOWEST)  # [B, H, T, S]
            top = jnp.maximum(top, jnp.max(jax.lax.stop_gradient(s_past), axis=-1, keepdims=True))
        e_new = jnp.exp(s_new - top)
        total = jnp.sum(e_new, axis=-1, keepdims=True)
        if past is not None:
            e_past = jnp.exp(s_past - top)
            total = total + jnp.sum(e_past, axis=-1, keepdims=True)
        drop = drop or (lambda p: p)
        if past is None:
            # Values weighted by the exps, then divided by their total: the normalized [B, H, T,
            # T] probabilities never exist, and XLA:GPU computes the exps inside the product.
            out = einsum("bhtu,bhuk->bhtk", drop(e_new.astype(q.dtype)), v)  # [B, H, T, K]
            out = (out.astype(jnp.float32) / total).astype(q.dtype)
            return out.transpose(0, 2, 1, 3), None  # [B, T, H, K]
        out = einsum("bhtu,bhuk->bthk", drop((e_new / total).astype(q.dtype)), v)  # [B, T, H, K]
        probs = drop((e_past / total).astype(past_v.dtype))
        out = out + einsum("bhts,bhsk->bthk", probs, past_v).astype(out.dtype)
        # Write the new keys/values at slot `index` only after the old cache was read: a zero
        # computed from `out` makes the writes depend on the reads, so XLA updates the cache in
        # place instead of copying it every step. (A comparison, so NaN cannot leak in.)
        after = (jnp.sum(out) > 0).astype(k.dtype) * 0
        k, v = k + after, v + after
        cache = (
            jax.lax.dynamic_update_slice(past_k, k.astype(past_k.dtype), (0, 0, index, 0)),
            jax.lax.dynamic_update_slice(past_v, v.astype(past_v.dtype), (0, 0, index, 0)),
        )
        return out, cache

    def _attention_after_write(self, q, k, v, new_mask, scale, drop, past, past_ok, index):
        B, T, H, K = q.shape
        past_k, past_v = past  # [B, H, S, K] each
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, T, K]
        keys = jax.lax.dynamic_update_slice(past_k, k.astype(past_k.dtype), (0, 0, index, 0))
        values = jax.lax.dynamic_update_slice(past_v, v.astype(past_v.dtype), (0, 0, index, 0))
        slot = jnp.arange(past_k.shape[2])  # [S]
        new_ok = jnp.ones((B, T), jnp.bool_) if new_mask is None else new_mask.astype(jnp.bool_)
        new_slots = jax.lax.dynamic_update_slice(jnp.zeros_like(past_ok), new_ok, (0, index))
        causal = slot[None, :] <= index + jnp.arange(T)[:, None]  # [T, S]
        allowed = past_ok[:, None, :] | (new_slots[:, None, :] & causal[None])  # [B, T, S]
        einsum = _einsum(self._precision)
        scores = einsum("bhtk,bhsk->bhts", q.astype(keys.dtype), keys).astype(jnp.float32) * scale
        scores = jnp.where(allowed[:, None], scores, LOWEST)  # [B, H, T, S]
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        probs = drop(probs) if drop else probs
        out = einsum("bhts,bhsk->bthk", probs, values).astype(q.dtype)  # [B, T, H, K]
        return out, (keys, values)


def _einsum(precision):
    return lambda spec, a, b: jnp.einsum(spec, a, b, precision=precision)


def choose(
    precision: Precision | None = None, batch: int = 0, backend: str | None = None
) -> Kernels:
    """The kernels for a backend (default: JAX's), a precision (float32) and a decode batch.

    `batch` is the rows an engine decodes (0 for training and scoring): float32 decoding of
    one row on a CPU stores Dense kernels (out, in), which XLA:CPU reads at memory speed.
    """
    precision = precision or PRECISIONS["float32"]
    backend = backend or jax.default_backend()
    cpu = backend == "cpu"
    fused = backend in ("gpu", "cuda") and precision.compute == "bfloat16"
    return Kernels(
        backend="cpu" if cpu else backend,
        products=precision.products,
        out_in=cpu and precision.compute == "float32" and batch == 1,
        attention_impl="cudnn" if fused else "einsum",
        cache_write="last" if cpu else "first",
        vocab_multiple=1 if cpu else 64,
        pad_one_row=not cpu or precision.compute == "bfloat16",
        two_pass_variance=not cpu and batch > 0,
    )


_ACTIVE: contextvars.ContextVar[Kernels | None] = contextvars.ContextVar("kernels", default=None)


def active() -> Kernels:
    """The kernels of the enclosing `use`, else the default backend's in float32."""
    return _ACTIVE.get() or choose()


@contextlib.contextmanager
def use(kernels: Kernels) -> Iterator[Kernels]:
    """Trace the model with `kernels` inside this block."""
    token = _ACTIVE.set(kernels)
    try:
        yield kernels
    finally:
        _ACTIVE.reset(token)
