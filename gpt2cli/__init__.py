"""gpt2cli: a fast, faithful GPT-2 toolkit in JAX/Flax.

The Python API (imports JAX only when first used):

    config, params = gpt2cli.load("gpt2")           # .npz path, HF folder or Hub repo id
    out = gpt2cli.logits(config, params, input_ids)   # [batch, seq, vocab]
    gpt2cli.save("model.npz", config, params)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "load": "gpt2cli.api",
    "logits": "gpt2cli.api",
    "save": "gpt2cli.api",
    "GPT2Config": "gpt2cli.config",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'gpt2cli' has no attribute {name!r}")
