"""Log-probabilities of tokens given the tokens before them: teacher-forced forward passes over
batches of sequences, for `gpt2 eval --task` and the server's echoed prompts.

A sequence of n tokens is scored in one pass over its first n - 1: entry i of the result is
the log-probability of token i + 1 given tokens 0..i. Sequences are sorted by length and cut
into batches of about `batch_tokens` tokens; a batch is padded on the right to one of a few
lengths (`length_buckets`) and to a power-of-two number of rows, so any mix of sequences
compiles once per (rows, length) shape. Padding never changes a real token's score: attention
is causal and padding comes last.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gpt2cli import kernels, precision
from gpt2cli.config import GPT2Config
from gpt2cli.errors import UserError
from gpt2cli.model import GPT2

TOP_LOGPROBS = 20  # the most alternatives a caller may ask for per token (OpenAI's limit)
BATCH_TOKENS = 4096  # tokens per pass: `gpt2 eval`'s default batch (4 windows of 1024)


@dataclass(frozen=True)
class Scored:
    """The scores of one sequence of n tokens."""

    logprobs: np.ndarray  # [n - 1] float32: token i + 1 given tokens 0..i
    top_ids: np.ndarray  # [n - 1, top] int32: the most likely tokens at each position
    top_logprobs: np.ndarray  # [n - 1, top] float32: their log-probabilities, best first


def length_buckets(most: int) -> list[int]:
    """Padded lengths: 16, 24, 32, 48, 64, 96, ... (at most a third is padding), then `most`."""
    sizes, n = [], 16
    while n < most:
        sizes += [n, n * 3 // 2]
        n *= 2
    return sorted({s for s in sizes if s < most} | {most})


class Scorer:
    """Scores token sequences with one model's weights, in a precision (precision.py).

    `out_in`: the Dense kernels of `params` are stored (out, in), as an `Engine` that decodes
    one row on a CPU keeps them (the server shares its engine's weights so).
    """

    def __init__(
        self,
        config: GPT2Config,
        params: dict,
        dtype: str = "float32",
        *,
        out_in: bool = False,
        batch_tokens: int = BATCH_TOKENS,
    ):
        policy = precision.get(dtype)
        self.config = config
        self.batch_tokens = batch_tokens
        self.lengths = length_buckets(config.n_positions)
        self.compute = policy.compute
        self.load(params, out_in=out_in)
        self.kernels = kernels.choose(policy)
        self.model = GPT2(config, dtype=jnp.dtype(policy.compute))
        self.run = self.kernels.jit(self._run, static_argnames="top")

    def load(self, params: dict, *, out_in: bool = False) -> None:
        """Score with these weights from now on; new weights of the same shapes compile
        nothing again (training scores its task so at every evaluation)."""
        self.params = jax.tree_util.tree_map_with_path(
            lambda path, a: _standard(path, jnp.asarray(a, self.compute), out_in), params
        )

    def _run(self, params, inputs, targets, *, top: int):
        """inputs, targets [B, L] -> target logprobs [B, L], top ids and logprobs [B, L, top]."""
        with kernels.use(self.kernels):
            logits, _ = self.model.apply({"params": params}, inputs)  # [B, L, V] float32
        norm = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - norm
        if not top:
            empty = jnp.zeros((*targets.shape, 0))
            return picked, empty.astype(jnp.int32), empty
        top_logits, top_ids = jax.lax.top_k(logits, top)  # [B, L, top]
        return picked, top_ids.astype(jnp.int32), top_logits - norm[..., None]

    def __call__(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        top: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> list[Scored]:
        """Score every sequence (2 to n_positions + 1 tokens each); `top`: how many alternatives
        per position (0..TOP_LOGPROBS); `progress(sequences)` after each pass."""
        if not 0 <= top <= TOP_LOGPROBS:
            raise UserError(f"top must be from 0 to {TOP_LOGPROBS}, got {top}")
        most = self.config.n_positions
        for seq in sequences:
            if not 2 <= len(seq) <= most + 1:
                raise UserError(
                    f"a scored sequence needs 2 to {most + 1} tokens (the model's context plus "
                    f"one), got {len(seq)}"
                )
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[Scored | None] = [None] * len(sequences)
        start = 0
        while start < len(order):
            length = next(n for n in self.lengths if n >= len(sequences[order[start]]) - 1)
            rows = _floor_pow2(max(self.batch_tokens // length, 1))
            batch = order[start : start + rows]
            padded_rows = min(rows, _ceil_pow2(len(batch)))
            inputs = np.zeros((padded_rows, length), np.int32)
            targets = np.zeros((padded_rows, length), np.int32)
            for row, i in enumerate(batch):
                seq = np.asarray(sequences[i], np.int32)
                inputs[row, : len(seq) - 1] = seq[:-1]
                targets[row, : len(seq) - 1] = seq[1:]
            picked, ids, lps = jax.device_get(self.run(self.params, inputs, targets, top=top))
            for row, i in enumerate(batch):
                n = len(sequences[i]) - 1
                out[i] = Scored(picked[row, :n], ids[row, :n], lps[row, :n])
            if progress:
                progress(len(batch))
            start += len(batch)
        return out


def _standard(path, a: jax.Array, out_in: bool) -> jax.Array:
    """A Dense kernel back in (in, out) if the engine stored it (out, in)."""
    return a.T if out_in and path[-1].key == "kernel" else a


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _ceil_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
