"""gpt2cli: a fast, faithful GPT-2 toolkit in JAX/Flax.

The Python API (imports JAX only when first used):

    config, params = gpt2cli.load("gpt2")           # .npz path, HF folder or Hub repo id
    out = gpt2cli.logits(config, params, input_ids)   # [batch, seq, vocab]
    gpt2cli.save("model.npz", config, params)
    logits, cache = gpt2cli.run_with_cache(config, params, input_ids, names=["blocks.*.resid_post"])
    logits = gpt2cli.run_with_hooks(config, params, input_ids, hooks={"blocks.0.attn.z": hook})

The package, in six groups (each module owns one idea; arrows point the one way imports go,
checked by pyproject's import-linter contracts):

    model core   config, model, hooks, kernels, precision: GPT-2's shapes and math, its named
                 points, run per backend
    files        weights, checkpoint, hub, tokenizer: safetensors, .npz, model references, BPE;
                 lora, adapter: LoRA adapters, their merge and PEFT's adapter folder
    generation   sampling, engine, generate, chat, scoring, api: compiled decoding and its text
                 streams, batched log-probabilities of given text
    lens         named activations, interventions, the logit lens, attention maps
    training/    settings, plan, driver, trainer, loop, data, prepare, shards, run_folder, ...
    serve/, cli/ the HTTP server and the commands, on top of the rest
    (plumbing: errors, atomic, fields, headers, progress, compile_cache, used by every group)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "load": "gpt2cli.api",
    "logits": "gpt2cli.api",
    "save": "gpt2cli.api",
    "run_with_cache": "gpt2cli.lens",
    "run_with_hooks": "gpt2cli.lens",
    "GPT2Config": "gpt2cli.config",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'gpt2cli' has no attribute {name!r}")
