"""The trainer: TrainConfig, the learning-rate schedule, AdamW, TrainState, the loss, and the
jitted train and evaluation steps (the host-side loop that drives them is loop.py).

Everything a step depends on (its batch, its dropout key, its learning rate) is a function of
the step number, so a run resumed from a checkpoint repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from gpt2cli import kernels, lora, precision
from gpt2cli.checkpoint import unflatten
from gpt2cli.config import GPT2Config
from gpt2cli.errors import ParameterError
from gpt2cli.lora import LoraSpec
from gpt2cli.model import GPT2, adapter_dropout
from gpt2cli.training import settings, sharding


@dataclass(frozen=True)
class TrainConfig:
    """Every setting that changes the numbers a run produces: the resolved, frozen view of
    `gpt2 train`'s settings (training/settings.py holds their defaults and help)."""

    batch_size: int  # sequences per micro-batch, all processes
    seq_length: int
    grad_accum: int  # micro-batches per optimizer step
    lr: float
    min_lr: float  # the cosine decay ends here
    warmup: int  # linear warm-up steps
    decay_steps: int  # the cosine reaches min_lr here; constant afterwards
    weight_decay: float  # on matrices and embeddings only
    beta1: float
    beta2: float
    grad_clip: float  # global-norm clipping; 0 turns it off
    dropout: float | None  # overrides the model's three dropout rates when set
    dtype: str  # a precision (precision.py); master weights stay float32
    remat: bool  # recompute each block backwards: less memory, slower
    seed: int  # init (from scratch), data order and dropout
    parallel: str  # one of sharding.MODES
    lora: LoraSpec | None  # train these adapters on a frozen model (None: every weight)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name in settings.FIELDS:
                settings.check_range(f.name, getattr(self, f.name))  # the settings' own ranges
        precision.get(self.dtype)
        if self.parallel not in sharding.MODES:
            raise ParameterError(
                "parallel", f"must be one of {sharding.MODES}, got {self.parallel!r}"
            )


def learning_rate(tc: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """Linear warm-up to lr (step 0 already moves), cosine decay to min_lr, then constant."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = tc.lr * (step + 1) / max(tc.warmup, 1)
        span = max(tc.decay_steps - tc.warmup, 1)
        progress = jnp.clip((step - tc.warmup) / span, 0.0, 1.0)
        cosine = tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < tc.warmup, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings), not on biases or LayerNorm (nanoGPT)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate(tc),
        b1=tc.beta1,
        b2=tc.beta2,
        eps=1e-8,
        weight_decay=tc.weight_decay,
        mask=decay_mask,
    )
    if tc.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
    return adamw


def training_config(model_config: GPT2Config, tc: TrainConfig) -> GPT2Config:
    """The model config used for training: the dropout override applied."""
    if tc.dropout is None:
        return model_config
    p = tc.dropout
    return model_config.replace(resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps done
    params: Any
    opt_state: Any


def token_loss(
    model: GPT2, params, tokens, rng, deterministic: bool, loss_chunks: int = 1
) -> jax.Array:
    """Mean next-token cross-entropy of [B, T+1] tokens.

    With `loss_chunks` > 1 the LM head and the loss run over that many slices of the sequence,
    each recomputed in the backward pass: the [B, T, V] float32 logits never exist at once.
    """
    hidden, head, targets = _hidden(model, params, tokens, rng, deterministic)
    if loss_chunks <= 1:
        return cross_entropy(head(hidden), targets).mean()
    B, T, _ = hidden.shape
    return _chunked_sum(head, hidden, targets, None, loss_chunks) / (B * T)


def masked_loss(
    model: GPT2, params, batch, rng, deterministic: bool, loss_chunks: int = 1
) -> tuple[jax.Array, jax.Array]:
    """(sum of the counted tokens' cross-entropy, how many count) of a (tokens [B, T+1],
    weights [B, T]) batch: weight 1 where a target counts (a reply's token), 0 where not (a
    prompt's token, padding), so those give no gradient."""
    tokens, weights = batch
    hidden, head, targets = _hidden(model, params, tokens, rng, deterministic)
    if loss_chunks <= 1 or targets.shape[1] % loss_chunks:
        total = jnp.sum(cross_entropy(head(hidden), targets) * weights)
    else:
        total = _chunked_sum(head, hidden, targets, weights, loss_chunks)
    return total, jnp.sum(weights)


def _hidden(model: GPT2, params, tokens, rng, deterministic: bool):
    """(final hidden states [B, T, D], the LM head, the targets [B, T]) of [B, T+1] tokens."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T] each
    rngs = None if deterministic else {"dropout": rng}
    hidden, _ = model.apply(
        {"params": params}, inputs, deterministic=deterministic, rngs=rngs, head=False
    )  # [B, T, D]
    table = params["wte"]["embedding"].astype(model.dtype)  # [V, D]
    # The head as the model runs it, but its logits [..., V'] may keep the table's padding
    head = functools.partial(kernels.active().head, table=table, keep_padding=True)
    return hidden, head, targets


def _chunked_sum(head, hidden, targets, weights, loss_chunks: int) -> jax.Array:
    """The summed (weighted, unless `weights` is None) loss, over `loss_chunks` slices."""
    B, T, D = hidden.shape
    slices = (hidden.reshape(B, loss_chunks, -1, D), targets.reshape(B, loss_chunks, -1))
    if weights is not None:
        slices += (weights.reshape(B, loss_chunks, -1),)

    @jax.checkpoint
    def chunk_loss(total, xs):
        x, y = xs[:2]  # [B, T/c, D], [B, T/c]
        losses = cross_entropy(head(x), y)  # [B, T/c] from [B, T/c, V'] float32 logits
        return total + (losses if weights is None else losses * xs[2]).sum(), None

    total, _ = jax.lax.scan(chunk_loss, 0.0, jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), slices))
    return total


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token: logits [..., V], targets [...] int -> [...].

    The target's logit is picked by comparing column numbers, not by indexing: the gradient of
    an index is a scatter into a [..., V] float32 array, where this gradient is elementwise and
    XLA computes the logits' whole gradient in one pass (on a GPU, 3.3 GB of memory traffic
    instead of 9.9 per 124M bf16 step at 16 x 1024).
    """
    columns = jnp.arange(logits.shape[-1])  # [V]
    picked = jnp.sum(jnp.where(columns == targets[..., None], logits, 0.0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - picked


class Trainer:
    """The model, optimizer, mesh and jitted steps of one training configuration."""

    def __init__(self, model_config: GPT2Config, tc: TrainConfig, loss_chunks: int | None = None):
        self.tc = tc
        self.model_config = training_config(model_config, tc)
        policy = precision.get(tc.dtype)
        self.kernels = kernels.choose(policy)
        self.loss_chunks = loss_chunks or 1
        if tc.seq_length % self.loss_chunks:
            self.loss_chunks = 1
        compute = jnp.dtype(policy.compute)
        self.model = GPT2(self.model_config, compute, param_dtype=jnp.float32, remat=tc.remat)
        self.tx = make_optimizer(tc)
        self.schedule = jax.jit(learning_rate(tc))  # one compile, not one per operation
        self.mesh = sharding.make_mesh(tc.parallel)
        sharding.check_batch(self.mesh, tc.batch_size)
        model_config.check_fits(tc.seq_length, "seq_length")
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.lora = tc.lora
        if self.lora is not None:
            self.lora.check_fits(model_config)
        # With LoRA, the frozen model's weights on the mesh, stored in the compute dtype (what
        # the steps read anyway): an argument of the steps, never donated or updated
        self.base = None
        self._base_shardings = None
        self._state_shardings = None
        self._init = None
        self._step = None
        self._eval = None
        self._merge = None

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def cached(model_config: GPT2Config, tc: TrainConfig) -> Trainer:
        """One Trainer (and so one compilation) per configuration in this process."""
        return Trainer(model_config, tc)

    # ---- state -------------------------------------------------------------------------

    def state_shardings(self, params_shape: Any) -> TrainState:
        opt_shape = jax.eval_shape(self.tx.init, params_shape)
        fsdp = self.tc.parallel == "fsdp" and self.lora is None  # adapters are tiny: replicated
        scalar = sharding.replicated(self.mesh)
        return TrainState(
            step=scalar,
            params=sharding.tree_shardings(params_shape, self.mesh, fsdp),
            opt_state=sharding.tree_shardings(opt_shape, self.mesh, fsdp),
        )

    def opt_state_template(self, params: Any) -> Any:
        """The optimizer state's structure and shapes, without computing it."""
        return jax.eval_shape(self.tx.init, params)

    def trained_template(self) -> Any:
        """Shapes of what the steps train: the model's params, or the LoRA adapters."""
        if self.lora is None:
            from gpt2cli.model import init_params

            return jax.eval_shape(lambda: init_params(self.model_config))
        shapes = lora.adapter_shapes(self.model_config, self.lora)
        flat = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
        return unflatten(flat)

    def fresh_state(self, params: Any) -> TrainState:
        """A new run's state from the starting model's weights: trained, or with --lora frozen
        under fresh adapters."""
        if self.lora is None:
            return self.create_state(params)
        adapters = lora.init_adapters(self.model_config, self.lora, self.tc.seed)
        return self.create_state(adapters, base=params)

    def create_state(
        self, params: Any, opt_state: Any = None, step: int = 0, base: Any = None
    ) -> TrainState:
        """Place params (and a saved optimizer state, else a fresh one) on the mesh; with LoRA
        `params` are the adapters and `base` the frozen model."""
        if self.lora is not None:
            self._place_base(base)
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
        shardings = self.state_shardings(params)
        self._state_shardings = shardings
        placed = sharding.put(params, shardings.params)
        if opt_state is None:
            if self._init is None:
                self._init = jax.jit(self.tx.init, out_shardings=shardings.opt_state)
            opt = self._init(placed)
        else:
            opt = sharding.put(opt_state, shardings.opt_state)
        return TrainState(
            step=sharding.put(np.int32(step), shardings.step),
            params=placed,
            opt_state=opt,
        )

    def _place_base(self, base: Any) -> None:
        dtype = jnp.dtype(self.model.dtype)
        fsdp = self.tc.parallel == "fsdp"
        self._base_shardings = sharding.tree_shardings(base, self.mesh, fsdp)

        def place(x, where):
            if isinstance(x, jax.Array) and jax.process_count() == 1:
                # a fresh --init model already on the device: moved, not copied through the
                # host (gpt2-xl's 6.2 GB would be held twice while it is placed)
                return jax.device_put(x.astype(dtype), where)
            return sharding.put(np.asarray(x, dtype), where)

        self.base = jax.tree.map(place, base, self._base_shardings)

    def model_params(self, params: Any) -> Any:
        """The whole model's weights: `params`, or with LoRA the frozen model with the adapters
        merged into it (for probes that run the model as inference does)."""
        if self.lora is None:
            return params
        if self._merge is None:
            self._merge = jax.jit(functools.partial(lora.merge, scale=self.lora.scale))
        return self._merge(self.base, params)

    # ---- jitted steps ------------------------------------------------------------------

    def _with_base(self, params, base):
        """What the model runs: `params`, or the frozen base with the adapters attached."""
        return params if self.lora is None else lora.attach(base, params, self.lora.scale)

    def _loss_and_grads(self, params, tokens, rng, base=None):
        """The loss and its gradient in `params` alone: with LoRA the frozen base gets none."""

        def loss(trained, tokens, rng):
            full = self._with_base(trained, base)
            return token_loss(self.model, full, tokens, rng, False, self.loss_chunks)

        with kernels.use(self.kernels), adapter_dropout(self._adapter_dropout):
            return jax.value_and_grad(loss)(params, tokens, rng)

    def _masked_sums(self, params, batch, rng, base=None):
        """((loss sum, counted tokens), gradient of the sum in `params` alone) of one
        (tokens, weights) batch."""

        def loss(trained, batch, rng):
            full = self._with_base(trained, base)
            return masked_loss(self.model, full, batch, rng, False, self.loss_chunks)

        with kernels.use(self.kernels), adapter_dropout(self._adapter_dropout):
            return jax.value_and_grad(loss, has_aux=True)(params, batch, rng)

    @property
    def _adapter_dropout(self) -> float:
        return self.lora.dropout if self.lora is not None else 0.0

    def _train_step(self, state: TrainState, batch, base: Any = None):
        """One optimizer step over [accum, rows, T+1] tokens, or a (tokens, weights [accum,
        rows, T]) pair: then the loss is the mean over the step's counted tokens."""
        key = jax.random.fold_in(jax.random.key(self.tc.seed), state.step)
        if isinstance(batch, tuple):
            loss, grads = self._masked_step(state.params, batch, key, base)
        else:
            loss, grads = self._packed_step(state.params, batch, key, base)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, {"loss": loss}

    def _packed_step(self, params, batch, key, base):
        accum = batch.shape[0]
        if accum == 1:
            return self._loss_and_grads(params, batch[0], key, base)

        def micro(carry, xs):
            tokens, i = xs
            loss, grads = self._loss_and_grads(params, tokens, jax.random.fold_in(key, i), base)
            total_loss, total_grads = carry
            return (total_loss + loss, jax.tree.map(jnp.add, total_grads, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss, grads), _ = jax.lax.scan(micro, (0.0, zeros), (batch, jnp.arange(accum)))
        return loss / accum, jax.tree.map(lambda g: g / accum, grads)

    def _masked_step(self, params, batch, key, base):
        accum = batch[0].shape[0]
        if accum == 1:
            (total, count), grads = self._masked_sums(params, (batch[0][0], batch[1][0]), key, base)
        else:

            def micro(carry, xs):
                micro_batch, i = xs
                (total, count), grads = self._masked_sums(
                    params, micro_batch, jax.random.fold_in(key, i), base
                )
                return jax.tree.map(jnp.add, carry, (total, count, grads)), None

            zeros = (0.0, 0.0, jax.tree.map(jnp.zeros_like, params))
            (total, count, grads), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum)))
        count = jnp.maximum(count, 1.0)  # a step with no counted token changes nothing
        return total / count, jax.tree.map(lambda g: g / count, grads)

    def place(self, local_batch):
        """This process's rows of a batch (an array, or a (tokens, weights) pair), sent to the
        devices that train on them."""
        return jax.tree.map(lambda a: sharding.put_batch(a, self.batch_sharding), local_batch)

    def step(self, state: TrainState, batch: np.ndarray | jax.Array) -> tuple[TrainState, dict]:
        """Run one step on this process's rows (placed or not); returns device values."""
        if self._step is None:
            shardings = self._state_shardings
            self._step = self.kernels.jit(
                self._train_step,
                in_shardings=(shardings, self.batch_sharding, self._base_shardings),
                out_shardings=(shardings, sharding.replicated(self.mesh)),
                donate_argnums=0,
            )
        if isinstance(jax.tree.leaves(batch)[0], np.ndarray):
            batch = self.place(batch)
        # The classic threefry layout draws dropout masks ~2.5x faster on CPU than the
        # partitionable one, and its numbers do not depend on the sharding either.
        with jax.threefry_partitionable(False):
            return self._step(state, batch, self.base)

    def eval_loss(self, params: Any, local_batches: list) -> float:
        """Mean loss over validation batches (each [1, rows, T+1], this process's rows), or
        over their counted tokens when they are (tokens, weights) pairs."""
        if self._eval is None:
            self._eval = self.kernels.jit(
                self._eval_loss,
                in_shardings=(
                    self._state_shardings.params,
                    self.batch_sharding,
                    self._base_shardings,
                ),
                out_shardings=sharding.replicated(self.mesh),
            )
        losses = jax.device_get(
            [self._eval(params, self.place(b), self.base) for b in local_batches]
        )
        if isinstance(local_batches[0], tuple):
            total, count = np.sum(losses, axis=0)
            return float(total / max(count, 1.0))
        return float(np.mean(losses))

    def _eval_loss(self, params, batch, base=None):
        full = self._with_base(params, base)
        with kernels.use(self.kernels):
            if isinstance(batch, tuple):
                first = (batch[0][0], batch[1][0])
                return jnp.stack(masked_loss(self.model, full, first, None, True))
            return token_loss(self.model, full, batch[0], None, True, self.loss_chunks)

    def lr_at(self, step: int) -> float:
        return float(self.schedule(step))
