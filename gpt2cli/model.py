"""GPT-2 in Flax linen: params (and an optional KV cache) in, logits (and the new cache) out.

Param names mirror the Hugging Face layout: `wte`, `wpe`, `h_{i}/{ln_1,attn,ln_2,mlp}`, `ln_f`.
HF's Conv1D stores weights as (in, out), exactly a Flax Dense kernel, so nothing is transposed.

Shapes: B batch, T new tokens, S attended slots (T without a cache, the cache length with one),
D n_embd, H heads, K head_dim, V vocab, I MLP width, L layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from gpt2cli.config import GPT2Config

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@struct.dataclass
class KVCache:
    """Fixed-size keys and values of every layer, and how many slots are filled.

    `keys[l]`, `values[l]`: [B, H, S, K] (heads outside slots, so attending reads each head's
    keys contiguously, with no transposed copy per step). `mask`: [B, S], true where a slot
    holds a real (not padding) token. `index`: the next slot to write, the same for every row (prompts
    are left-padded so they all end at the same slot).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, config: GPT2Config, batch: int, length: int, dtype: Any = jnp.float32):
        shape = (batch, config.n_head, length, config.head_dim)
        # Separate buffers per layer and for keys/values, so a jitted step can donate them all.
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)),
            mask=jnp.zeros((batch, length), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def length(self) -> int:
        return self.mask.shape[1]


class Dense(nn.Module):
    """`x @ kernel + bias` with HF's (in, out) kernel, or the same kernel stored (out, in).

    The (out, in) layout is for float32 decoding on CPU: a [B, in] x [out, in]^T product reads
    each weight row contiguously, which XLA runs near memory speed, while the (in, out) product
    of a single row is markedly slower. Same names, same values.
    """

    features: int
    std: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    out_in: bool = False

    @nn.compact
    def __call__(self, x):
        d_in = x.shape[-1]
        shape = (self.features, d_in) if self.out_in else (d_in, self.features)
        kernel = self.param("kernel", nn.initializers.normal(self.std), shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        # A 2-D product: XLA's CPU dot is fast for [N, in] but slow in bfloat16 for [B, T, in].
        rows = x.reshape(-1, d_in)  # [N, in]
        product = rows_times_out_in if self.out_in else rows_times_in_out
        y = product(rows, kernel)  # [N, out]
        return y.reshape(*x.shape[:-1], self.features) + bias


def rows_times_in_out(rows: jax.Array, kernel: jax.Array) -> jax.Array:
    """[N, in] x [in, out] -> [N, out], in the dtype of `rows`.

    In bfloat16 the product accumulates in float32, which is also what lets XLA:CPU hand it to
    its fast bfloat16 kernels (YNNPACK). Those take matrices only, not a single row, so one row
    is padded to two: the weights are still read once.
    """
    if kernel.dtype != jnp.bfloat16:
        return jax.lax.dot_general(rows, kernel, (((1,), (0,)), ((), ())))
    n = rows.shape[0]
    padded = jnp.pad(rows, ((0, 1), (0, 0))) if n == 1 else rows  # [max(N, 2), in]
    y = jax.lax.dot_general(
        padded, kernel, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return y[:n].astype(rows.dtype)


def rows_times_out_in(rows: jax.Array, kernel: jax.Array) -> jax.Array:
    """[N, in] x [out, in]^T -> [N, out], in the dtype of `rows`.

    XLA:CPU runs a bfloat16 product against a transposed kernel many times slower than a float32
    one. For one row a fused multiply-and-sum over float32-widened weights streams the bfloat16
    weights instead; for several rows the float32 product over widened weights is faster.
    """
    if kernel.dtype != jnp.bfloat16:
        return jax.lax.dot_general(rows, kernel, (((1,), (1,)), ((), ())))  # [N, out]
    wide = jnp.float32
    if rows.shape[0] == 1:
        # XLA would rather widen the whole kernel to a float32 copy in memory (~150 MB for the
        # tied head) than inside the product: when another op reads the kernel too (the head's
        # embedding lookup), and in a decode loop, where the widening does not change from step
        # to step and is hoisted out. Tying the kernel to this step's row prevents both.
        kernel, rows = jax.lax.optimization_barrier((kernel, rows))
        y = jnp.sum(kernel.astype(wide) * rows.astype(wide), axis=-1)[None]  # [1, out]
    else:
        y = jax.lax.dot_general(rows.astype(wide), kernel.astype(wide), (((1,), (1,)), ((), ())))
    return y.astype(rows.dtype)


class Embed(nn.Embed):
    """Flax's embedding table, looked up row by row before any change of dtype."""

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding  # [N, D]
        if table.dtype == jnp.bfloat16:
            # XLA:CPU gathers bfloat16 through a float32 copy of the table. Fused with the
            # gather that costs nothing, but in a decode loop XLA would hoist the copy (~150 MB
            # for wte) out of the loop; tying the table to this step's ids keeps it inside.
            table, ids = jax.lax.optimization_barrier((table, ids))
        return jnp.take(table, ids, axis=0).astype(self.dtype)


class Attention(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    out_in: bool = False

    @nn.compact
    def __call__(self, x, new_mask, past_ok, cache_kv, index, deterministic):
        # new_mask: [B, T] real new tokens; past_ok: [B, S] cache slots to attend to (or None).
        cfg = self.config
        B, T, D = x.shape
        H, K = cfg.n_head, cfg.head_dim
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5

        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, out_in=self.out_in)
        qkv = Dense(3 * D, 0.02, **dense, name="c_attn")(x)  # [B, T, 3D]
        q, k, v = jnp.split(qkv, 3, axis=-1)  # 3 x [B, T, D]
        q, k, v = (a.reshape(B, T, H, K).transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, T, K]

        scale = 1.0
        if cfg.scale_attn_weights:
            scale /= K**0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        lowest = jnp.finfo(jnp.float32).min

        # Attend to the new tokens (causally) and to the cache as it was before this call, as two
        # blocks of one softmax. Reading the updated cache instead would make XLA copy it.
        causal = jnp.tril(jnp.ones((T, T), jnp.bool_))  # [T, U]
        allowed = causal[None] & new_mask[:, None, :]  # [B, T, U]
        s_new = jnp.einsum("bhtk,bhuk->bhtu", q, k).astype(jnp.float32) * scale
        s_new = jnp.where(allowed[:, None], s_new, lowest)  # [B, H, T, U]
        top = jnp.max(s_new, axis=-1, keepdims=True)  # [B, H, T, 1]
        if cache_kv is not None:
            past_k, past_v = cache_kv  # [B, H, S, K] each
            s_past = jnp.einsum("bhtk,bhsk->bhts", q.astype(past_k.dtype), past_k)
            s_past = s_past.astype(jnp.float32) * scale
            s_past = jnp.where(past_ok[:, None, None, :], s_past, lowest)  # [B, H, T, S]
            top = jnp.maximum(top, jnp.max(s_past, axis=-1, keepdims=True))
        e_new = jnp.exp(s_new - top)
        total = jnp.sum(e_new, axis=-1, keepdims=True)
        if cache_kv is not None:
            e_past = jnp.exp(s_past - top)
            total = total + jnp.sum(e_past, axis=-1, keepdims=True)
        drop = nn.Dropout(cfg.attn_pdrop)
        probs = drop((e_new / total).astype(self.dtype), deterministic=deterministic)
        out = jnp.einsum("bhtu,bhuk->bthk", probs, v)  # [B, T, H, K]
        if cache_kv is not None:
            probs = drop((e_past / total).astype(past_v.dtype), deterministic=deterministic)
            out = out + jnp.einsum("bhts,bhsk->bthk", probs, past_v).astype(self.dtype)
            # Write the new keys/values at slot `index` only after the old cache was read: a zero
            # computed from `out` makes the writes depend on the reads, so XLA updates the cache
            # in place instead of copying it every step. (A comparison, so NaN cannot leak in.)
            after = (jnp.sum(out) > 0).astype(k.dtype) * 0
            k, v = k + after, v + after
            cache_kv = (
                jax.lax.dynamic_update_slice(past_k, k.astype(past_k.dtype), (0, 0, index, 0)),
                jax.lax.dynamic_update_slice(past_v, v.astype(past_v.dtype), (0, 0, index, 0)),
            )
        out = out.reshape(B, T, D)
        out = Dense(D, proj_std, **dense, name="c_proj")(out)  # [B, T, D]
        return out, cache_kv


class MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    out_in: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, out_in=self.out_in)
        h = Dense(cfg.mlp_width, 0.02, **dense, name="c_fc")(x)  # [B, T, I]
        h = _ACTIVATIONS[cfg.activation_function](h)
        return Dense(cfg.n_embd, proj_std, **dense, name="c_proj")(h)  # [B, T, D]


class Block(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    out_in: bool = False

    @nn.compact
    def __call__(self, x, new_mask, past_ok, cache_kv, index, deterministic):
        cfg = self.config
        norm = dict(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype)
        drop = nn.Dropout(cfg.resid_pdrop)

        attn = Attention(
            cfg, self.layer_idx, self.dtype, self.param_dtype, self.out_in, name="attn"
        )
        a, cache_kv = attn(
            nn.LayerNorm(**norm, name="ln_1")(x),
            new_mask,
            past_ok,
            cache_kv,
            index,
            deterministic,
        )
        x = x + drop(a, deterministic=deterministic)  # [B, T, D]
        m = MLP(cfg, self.dtype, self.param_dtype, self.out_in, name="mlp")(
            nn.LayerNorm(**norm, name="ln_2")(x)
        )
        x = x + drop(m, deterministic=deterministic)  # [B, T, D]
        return x, cache_kv


class GPT2(nn.Module):
    """GPT-2 language model with the LM head tied to the token embedding."""

    config: GPT2Config
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    out_in: bool = False  # Dense kernels stored (out, in): see Dense

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,  # [B, T] int
        positions: jax.Array | None = None,  # [B, T] int; default 0..T-1
        attention_mask: jax.Array | None = None,  # [B, T] 1 = real token, 0 = padding
        cache: KVCache | None = None,
        deterministic: bool = True,
        logits_at: jax.Array | None = None,  # [B] one column per row: logits only there
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        new_mask = jnp.ones((B, T), jnp.bool_) if attention_mask is None else attention_mask
        new_mask = new_mask.astype(jnp.bool_)

        index, past_ok = jnp.zeros((), jnp.int32), None
        if cache is not None:
            index = cache.index
            past_ok = cache.mask & (jnp.arange(cache.length) < index)[None]  # [B, S]

        wte = Embed(
            cfg.vocab_size,
            cfg.n_embd,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="wte",
        )
        wpe = Embed(
            cfg.n_positions,
            cfg.n_embd,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.01),
            name="wpe",
        )
        x = wte(input_ids) + wpe(positions)  # [B, T, D]
        x = nn.Dropout(cfg.embd_pdrop)(x, deterministic=deterministic)

        new_keys, new_values = [], []
        for i in range(cfg.n_layer):
            layer_kv = None if cache is None else (cache.keys[i], cache.values[i])
            block = Block(cfg, i, self.dtype, self.param_dtype, self.out_in, name=f"h_{i}")
            x, layer_kv = block(x, new_mask, past_ok, layer_kv, index, deterministic)
            if cache is not None:
                new_keys.append(layer_kv[0])
                new_values.append(layer_kv[1])

        if logits_at is not None:  # a prefill needs the next token of each row only
            x = x[jnp.arange(B), logits_at][:, None]  # [B, 1, D]
        x = nn.LayerNorm(
            epsilon=cfg.layer_norm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="ln_f",
        )(x)
        rows = x.reshape(-1, cfg.n_embd)  # [B * (T or 1), D]: a 2-D dot, see Dense
        rows = rows.astype(self.dtype)
        table = wte.embedding.astype(self.dtype)  # [V, D]: an (out, in) kernel
        logits = rows_times_out_in(rows, table).reshape(*x.shape[:2], -1).astype(jnp.float32)

        if cache is not None:
            mask = jax.lax.dynamic_update_slice(cache.mask, new_mask, (0, index))  # [B, S]
            cache = KVCache(tuple(new_keys), tuple(new_values), mask, index + T)
        return logits, cache


def init_params(config: GPT2Config, seed: int = 0, param_dtype: Any = jnp.float32) -> dict:
    """Fresh GPT-2 weights (normal 0.02, residual projections scaled by 1/sqrt(2L))."""
    model = GPT2(config, param_dtype=param_dtype)
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(model.init)(jax.random.key(seed), dummy)["params"]
