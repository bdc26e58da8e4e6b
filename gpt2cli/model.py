"""GPT-2 in Flax linen: params (and an optional KV cache) in, logits (and the new cache) out.

Param names mirror the Hugging Face layout: `wte`, `wpe`, `h_{i}/{ln_1,attn,ln_2,mlp}`, `ln_f`.
HF's Conv1D stores weights as (in, out), exactly a Flax Dense kernel, so nothing is transposed.
How each product and the attention are computed on this backend is `kernels.py`'s business.
Every activation TransformerLens names passes through `hooks.point`, the identity unless a lens
run (lens.py) reads or changes it.

Shapes: B batch, T new tokens, S attended slots (T without a cache, the cache length with one),
D n_embd, H heads, K head_dim, V vocab, I MLP width, L layers.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from gpt2cli import hooks, kernels
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

    def with_length(self, length: int) -> KVCache:
        """The same cache with `length` slots: later slots dropped, or new ones empty (masked)."""

        def fit(a, axis):
            if a.shape[axis] >= length:
                return jax.lax.slice_in_dim(a, 0, length, axis=axis)
            pad = [(0, 0)] * a.ndim
            pad[axis] = (0, length - a.shape[axis])
            return jnp.pad(a, pad)

        return self.replace(
            keys=tuple(fit(k, 2) for k in self.keys),
            values=tuple(fit(v, 2) for v in self.values),
            mask=fit(self.mask, 1),
        )


_ADAPTER_DROPOUT: contextvars.ContextVar[float] = contextvars.ContextVar(
    "adapter_dropout", default=0.0
)


@contextlib.contextmanager
def adapter_dropout(rate: float) -> Iterator[None]:
    """Trace a training step with this dropout on every LoRA adapter's input (PEFT's
    lora_dropout); outside, adapters see their input as it is."""
    token = _ADAPTER_DROPOUT.set(rate)
    try:
        yield
    finally:
        _ADAPTER_DROPOUT.reset(token)


class Dense(nn.Module):
    """`x @ kernel + bias` with HF's (in, out) kernel (the kernels may store it (out, in)), plus
    `dropout(x) @ lora_a @ lora_b` where a training step attached a LoRA adapter (lora.py)."""

    features: int
    std: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = kernels.active().kernel_shape(x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.normal(self.std), shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = kernels.active().linear(x, kernel) + bias  # [..., out]
        if self.has_variable("params", "lora_a"):
            y = y + self._adapter(x)
        return y

    def _adapter(self, x):
        a = self.get_variable("params", "lora_a").astype(self.dtype)  # [in, r]
        b = self.get_variable("params", "lora_b").astype(self.dtype)  # [r, out], scale applied
        rate = _ADAPTER_DROPOUT.get()
        if rate > 0 and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
        linear = kernels.active().linear
        return linear(linear(x, a), b)  # [..., r] -> [..., out]


class Embed(nn.Embed):
    """Flax's embedding table, looked up before any change of dtype."""

    def __call__(self, ids: jax.Array) -> jax.Array:
        return kernels.active().lookup(self.embedding, ids).astype(self.dtype)  # [..., D]


class Attention(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, new_mask, past_ok, cache_kv, index, deterministic):
        # new_mask: [B, T] real new tokens or None (all real); past_ok: [B, S] cache slots to
        # attend to (or None).
        cfg = self.config
        B, T, D = x.shape
        H, K = cfg.n_head, cfg.head_dim
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5
        at = f"blocks.{self.layer_idx}.attn"

        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Dense(3 * D, 0.02, **dense, name="c_attn")(x)  # [B, T, 3D]
        q, k, v = (a.reshape(B, T, H, K) for a in jnp.split(qkv, 3, axis=-1))  # 3 x [B, T, H, K]
        q, k, v = (hooks.point(f"{at}.{n}", a) for n, a in zip("qkv", (q, k, v), strict=True))

        scale = 1.0
        if cfg.scale_attn_weights:
            scale /= K**0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1

        dropout = nn.Dropout(cfg.attn_pdrop)
        drop = None
        if not deterministic and cfg.attn_pdrop > 0:

            def drop(probs):
                return dropout(probs, deterministic=False)

        # softmax(q k^T * scale, causal and masked) v, over the cache and the new tokens
        out, cache_kv = kernels.active().attention(
            q, k, v, new_mask, scale, drop, cache_kv, past_ok, index
        )  # [B, T, H, K]
        if hooks.wanted(f"{at}.scores", f"{at}.pattern"):  # a lens run (no dropout)
            if past_ok is not None:
                raise ValueError(
                    "attention scores and patterns are points of a forward pass over "
                    "the whole sequence, not of a step over a KV cache"
                )
            out = _pattern_points(at, q, k, v, new_mask, scale, out)
        out = hooks.point(f"{at}.z", out)
        out = Dense(D, proj_std, **dense, name="c_proj")(out.reshape(B, T, D))  # [B, T, D]
        return out, cache_kv


def _pattern_points(at, q, k, v, new_mask, scale, out):
    """The attention's scores and pattern [B, H, T, T] as points. The kernels' output z stands
    unless a hook changed them: then z is the changed pattern times the values."""
    T = q.shape[1]
    allowed = jnp.tril(jnp.ones((T, T), jnp.bool_))[None, None]  # [1, 1, T, U]
    if new_mask is not None:
        allowed = allowed & new_mask[:, None, None, :]  # [B, 1, T, U]
    products = kernels.active().products
    scores = jnp.einsum("bthk,buhk->bhtu", q, k, precision=products).astype(jnp.float32) * scale
    scores = jnp.where(allowed, scores, -jnp.inf)  # [B, H, T, U]
    hooked_scores = hooks.point(f"{at}.scores", scores)
    pattern = jax.nn.softmax(hooked_scores, axis=-1)  # [B, H, T, U]
    hooked_pattern = hooks.point(f"{at}.pattern", pattern)
    if hooked_scores is scores and hooked_pattern is pattern:
        return out
    z = jnp.einsum("bhtu,buhk->bthk", hooked_pattern.astype(v.dtype), v, precision=products)
    return z  # [B, T, H, K]


class MLP(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        at = f"blocks.{self.layer_idx}.mlp"
        h = Dense(cfg.mlp_width, 0.02, **dense, name="c_fc")(x)  # [B, T, I]
        h = hooks.point(f"{at}.pre", h)
        h = hooks.point(f"{at}.post", _ACTIVATIONS[cfg.activation_function](h))
        return Dense(cfg.n_embd, proj_std, **dense, name="c_proj")(h)  # [B, T, D]


def layer_norm(x: jax.Array, cfg: GPT2Config, dtype, param_dtype, name: str) -> jax.Array:
    """GPT-2's LayerNorm of x [..., D]; the kernels say how its variance is summed."""
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=kernels.active().one_pass_variance(x),
        name=name,
    )(x)


class Block(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, new_mask, past_ok, cache_kv, index, deterministic):
        cfg = self.config
        i = self.layer_idx
        drop = nn.Dropout(cfg.resid_pdrop)

        x = hooks.point(f"blocks.{i}.resid_pre", x)  # [B, T, D]
        normed = layer_norm(x, cfg, self.dtype, self.param_dtype, "ln_1")
        attn = Attention(cfg, i, self.dtype, self.param_dtype, name="attn")
        a, cache_kv = attn(
            hooks.point(f"blocks.{i}.ln1.normalized", normed),
            new_mask,
            past_ok,
            cache_kv,
            index,
            deterministic,
        )
        a = hooks.point(f"blocks.{i}.attn.out", a)
        x = hooks.point(f"blocks.{i}.resid_mid", x + drop(a, deterministic=deterministic))
        normed = layer_norm(x, cfg, self.dtype, self.param_dtype, "ln_2")
        m = MLP(cfg, i, self.dtype, self.param_dtype, name="mlp")(
            hooks.point(f"blocks.{i}.ln2.normalized", normed)
        )
        m = hooks.point(f"blocks.{i}.mlp.out", m)
        x = hooks.point(f"blocks.{i}.resid_post", x + drop(m, deterministic=deterministic))
        return x, cache_kv


class GPT2(nn.Module):
    """GPT-2 language model with the LM head tied to the token embedding."""

    config: GPT2Config
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: bool = False  # recompute each block's activations in the backward pass (memory)

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,  # [B, T] int
        positions: jax.Array | None = None,  # [B, T] int; default 0..T-1
        attention_mask: jax.Array | None = None,  # [B, T] 1 = real token, 0 = padding
        cache: KVCache | None = None,
        deterministic: bool = True,
        logits_at: jax.Array | None = None,  # [B] one column per row: logits only there
        head: bool = True,  # False: the final hidden states [B, T, D] instead of logits
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        new_mask = None if attention_mask is None else attention_mask.astype(jnp.bool_)

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
        tokens = hooks.point("embed", wte(input_ids))  # [B, T, D]
        x = tokens + hooks.point("pos_embed", wpe(positions))  # [B, T, D]
        x = nn.Dropout(cfg.embd_pdrop)(x, deterministic=deterministic)

        block_type = nn.remat(Block, static_argnums=(6,)) if self.remat else Block
        new_keys, new_values = [], []
        for i in range(cfg.n_layer):
            layer_kv = None if cache is None else (cache.keys[i], cache.values[i])
            block = block_type(cfg, i, self.dtype, self.param_dtype, name=f"h_{i}")
            x, layer_kv = block(x, new_mask, past_ok, layer_kv, index, deterministic)
            if cache is not None:
                new_keys.append(layer_kv[0])
                new_values.append(layer_kv[1])

        if logits_at is not None:  # a prefill needs the next token of each row only
            x = x[jnp.arange(B), logits_at][:, None]  # [B, 1, D]
        x = layer_norm(x, cfg, self.dtype, self.param_dtype, "ln_f")
        x = hooks.point("ln_final.normalized", x)  # [B, T or 1, D]
        if head:
            table = wte.embedding.astype(self.dtype)  # [V, D]
            x = kernels.active().head(x.astype(self.dtype), table)  # [B, T or 1, V] float32

        if cache is not None:
            real = jnp.ones((B, T), jnp.bool_) if new_mask is None else new_mask
            mask = jax.lax.dynamic_update_slice(cache.mask, real, (0, index))  # [B, S]
            cache = KVCache(tuple(new_keys), tuple(new_values), mask, index + T)
        return x, cache


def init_params(config: GPT2Config, seed: int = 0, param_dtype: Any = jnp.float32) -> dict:
    """Fresh GPT-2 weights (normal 0.02, residual projections scaled by 1/sqrt(2L))."""
    model = GPT2(config, param_dtype=param_dtype)
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(model.init)(jax.random.key(seed), dummy)["params"]
