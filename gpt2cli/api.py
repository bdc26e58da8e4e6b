"""The Python API: load a model from any reference, run it, save it. No CLI involved."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt2cli import kernels, precision
from gpt2cli.checkpoint import save_npz
from gpt2cli.config import GPT2Config
from gpt2cli.errors import UserError
from gpt2cli.hub import load_model
from gpt2cli.model import GPT2
from gpt2cli.weights import Params


def load(ref: str) -> tuple[GPT2Config, Params]:
    """(config, params) from a .npz path, a local Hugging Face folder or a Hub repo id."""
    return load_model(ref)


def save(path: str | Path, config: GPT2Config, params: Params, *, force: bool = False) -> Path:
    """Write a .npz checkpoint atomically at exactly `path`; returns that path."""
    return save_npz(path, config, params, force=force)


@functools.lru_cache(maxsize=8)
def _forward(config: GPT2Config, dtype: str):
    policy = precision.get(dtype)
    model = GPT2(config, dtype=jnp.dtype(policy.compute))
    chosen = kernels.choose(policy)

    def forward(params, ids):
        with kernels.use(chosen):
            return model.apply({"params": params}, ids)[0]

    return chosen.jit(forward)


def logits(config: GPT2Config, params: Params, input_ids, *, dtype: str = "float32") -> jax.Array:
    """Next-token logits, float32 [batch, seq, vocab], for int ids [batch, seq] (or [seq]).

    `dtype` is a precision (float32, tf32 or bfloat16; see precision.py).
    """
    ids = checked_ids(config, input_ids)
    return _forward(config, dtype)(params, jnp.asarray(ids, jnp.int32))


def checked_ids(config: GPT2Config, input_ids) -> np.ndarray:
    """int ids [batch, seq] (or [seq]) as a [batch, seq] array, or a UserError saying what is
    wrong with them: not integers, empty, longer than the model's window, outside the vocab."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
        raise UserError(
            f"input_ids must be integers shaped [batch, seq], got {ids.dtype} {ids.shape}"
        )
    config.check_fits(ids.shape[1], "input_ids length")
    config.check_ids(ids, "input_ids")
    return ids
