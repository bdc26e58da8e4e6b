"""`pytest --simulate-gpu`: the suite on this CPU with the kernels a GPU would choose.

A test written against the CPU's kernels (its float32 cache, decode chunk of 4, (out, in)
layout) fails here as it would on a GPU, without one. cuDNN is absent, so its attention call
runs by XLA (the same `jax.nn.dot_product_attention` call). What this cannot show: cuBLAS's
rounding and the GPU's own timings.
"""

from __future__ import annotations

import dataclasses

ACTIVE = False  # set by conftest; CLI subprocesses started by the tests install it too


def install() -> None:
    """Make `kernels.choose()` (no backend named) pick a GPU's kernels from now on."""
    global ACTIVE
    from gpt2cli import kernels

    real = kernels.choose

    def as_on_a_gpu(precision=None, batch=0, backend=None):
        if backend is not None:  # a backend asked for by name gets the real table
            return real(precision, batch, backend)
        chosen = real(precision, batch, "gpu")
        if chosen.attention_impl == "cudnn":
            chosen = dataclasses.replace(chosen, attention_impl="xla")
        return chosen

    kernels.choose = as_on_a_gpu
    ACTIVE = True
