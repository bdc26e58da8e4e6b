"""The allowed range of every sampling setting and of seeds, without importing JAX, so the CLI
checks its flags before it spends seconds loading anything."""

from __future__ import annotations

import math

from gpt2cli.errors import UserError

MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_SEED = 2**32 - 1  # JAX and numpy seeds are unsigned 32-bit


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed}")


def check_sampling(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
) -> None:
    """Raise UserError naming the allowed range for the first value outside it."""
    if not isinstance(temperature, int | float) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise UserError(
            f"temperature must be between 0 and {MAX_TEMPERATURE:g} (0 = greedy), got {temperature}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not isinstance(top_p, int | float) or not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not isinstance(min_p, int | float) or not 0.0 <= min_p <= 1.0:
        raise UserError(f"min_p must be in [0, 1] (0 = off), got {min_p}")
    if not isinstance(repetition_penalty, int | float) or not (
        0.0 < repetition_penalty <= MAX_REPETITION_PENALTY
    ):
        raise UserError(
            f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), "
            f"got {repetition_penalty}"
        )
    if math.isnan(temperature + top_p + min_p + repetition_penalty):
        raise UserError("sampling values must be numbers, got NaN")
