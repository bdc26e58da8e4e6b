"""Loss and perplexity of a model on a token stream, over fixed-length sliding windows.

The windows follow the Hugging Face perplexity guide: window w covers tokens
[w*stride, w*stride + length); it scores only the tokens past the previous window's end, and
never its own first token (nothing precedes it in the window). With stride == length the
windows do not overlap. Perplexity is exp(sum of token NLLs / number of scored tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt2cli import kernels, precision
from gpt2cli.config import GPT2Config
from gpt2cli.errors import ParameterError, UserError
from gpt2cli.model import GPT2
from gpt2cli.training.examples import Examples, gather


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window
    end: int  # one past its last token
    first_scored: int  # first token whose NLL counts


def windows(n_tokens: int, length: int, stride: int) -> list[Window]:
    if length < 2:
        raise ParameterError("length", f"must be at least 2 to score a token, got {length}")
    if not 1 <= stride <= length:
        raise ParameterError(
            "stride", f"must be between 1 and the window length ({length}), got {stride}"
        )
    if n_tokens < 2:
        raise UserError(f"the text has {n_tokens} token(s); at least 2 are needed to score one")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + length, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@dataclass(frozen=True)
class EvalResult:
    sum_nll: float
    n_tokens: int
    n_windows: int

    @property
    def loss(self) -> float:
        return self.sum_nll / self.n_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def window_arrays(tokens: np.ndarray, wins: list[Window], length: int):
    """[W, length] inputs, [W, length] targets and [W, length] score mask (padding masked)."""
    n = len(wins)
    inputs = np.zeros((n, length), np.int32)
    targets = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), np.float32)
    for row, w in enumerate(wins):
        size = w.end - w.begin
        inputs[row, :size] = tokens[w.begin : w.end]
        targets[row, : size - 1] = tokens[w.begin + 1 : w.end]
        # position t predicts token begin + t + 1
        mask[row, w.first_scored - w.begin - 1 : size - 1] = 1.0
    return inputs, targets, mask


def make_scorer(config: GPT2Config, dtype: str) -> Callable:
    """A jitted (params, inputs, targets, mask) -> per-row sum of scored NLLs."""
    policy = precision.get(dtype)
    model = GPT2(config, dtype=jnp.dtype(policy.compute))
    chosen = kernels.choose(policy)

    @chosen.jit
    def score(params, inputs, targets, mask):
        with kernels.use(chosen):
            logits, _ = model.apply({"params": params}, inputs)  # [B, L, V] float32
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, L]
        return jnp.sum(nll * mask, axis=-1)

    return score


def evaluate(
    config: GPT2Config,
    params: Any,
    tokens: np.ndarray,
    *,
    length: int,
    stride: int,
    batch_size: int = 8,
    dtype: str = "float32",  # a precision (precision.py)
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    config.check_fits(length, "length")
    if batch_size <= 0:
        raise ParameterError("batch_size", f"must be a positive integer, got {batch_size}")
    wins = windows(len(tokens), length, stride)
    inputs, targets, mask = window_arrays(tokens, wins, length)
    pad = -len(wins) % batch_size  # whole batches only: one compiled shape
    if pad:
        inputs, targets, mask = (np.pad(a, ((0, pad), (0, 0))) for a in (inputs, targets, mask))
    score = make_scorer(config, dtype)
    params = jax.device_put(params)
    sums = []
    for start in range(0, len(inputs), batch_size):
        rows = slice(start, start + batch_size)
        sums.append(score(params, inputs[rows], targets[rows], mask[rows]))
        if progress:
            progress(min(start + batch_size, len(wins)), len(wins))
    total = float(np.sum(np.concatenate(jax.device_get(sums)), dtype=np.float64))
    return EvalResult(total, int(mask.sum()), len(wins))


def evaluate_examples(
    config: GPT2Config,
    params: Any,
    examples: Examples,
    *,
    length: int,
    batch_size: int = 8,
    dtype: str = "float32",
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """The loss over the counted tokens of examples of their own (instruction or chat rows,
    their mask as `gpt2 train` reads them), each from its first token, cut to `length` + 1."""
    config.check_fits(length, "length")
    score = make_scorer(config, dtype)
    params = jax.device_put(params)
    sums, counted = [], 0
    for start in range(0, len(examples), batch_size):
        end = min(start + batch_size, len(examples))
        rows = np.resize(np.arange(start, end), batch_size)  # whole batches: one compiled shape
        tokens, weights = gather(examples, rows, length, pad=0)
        weights[end - start :] = 0  # the rows repeated to fill the last batch
        sums.append(score(params, tokens[:, :-1], tokens[:, 1:], weights))
        counted += int(weights.sum())
        if progress:
            progress(end, len(examples))
    total = float(np.sum(np.concatenate(jax.device_get(sums)), dtype=np.float64))
    return EvalResult(total, counted, len(examples))
