"""A LoRA adapter folder in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

So `peft.PeftModel.from_pretrained(GPT2LMHeadModel, folder)` loads what `gpt2 train --lora`
writes, and an adapter PEFT trained loads here. PEFT names GPT-2's arrays
`base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]); its update of a Conv1D kernel (in, out) is `(B @ A).T * alpha / r` (GPT-2's Conv1D
needs `fan_in_fan_out`). lora.py keeps A [in, r] and B [r, out]: the transposes of PEFT's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from gpt2cli import lora
from gpt2cli.atomic import atomic_write
from gpt2cli.checkpoint import flatten, unflatten
from gpt2cli.config import GPT2Config
from gpt2cli.errors import UserError
from gpt2cli.headers import read_json
from gpt2cli.weights import Params

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model.transformer."
_KEY = re.compile(
    r"^base_model\.model\.(?:transformer\.)?h\.(?P<layer>\d+)\."
    r"(?P<target>attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_(?P<ab>[AB])\.weight$"
)


def is_adapter(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def peft_config(spec: lora.LoraSpec, base: str | None) -> dict[str, Any]:
    """adapter_config.json: what PEFT's LoraConfig saves for this adapter (fields left out take
    PEFT's defaults when it loads the file)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.targets),
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out)
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


def peft_tensors(adapters: Params) -> dict[str, np.ndarray]:
    """PEFT's names and orientation of every adapter array (float32)."""
    tensors = {}
    for name, value in flatten(adapters).items():
        layer, module, dense, leaf = name.split("/")  # h_0, attn, c_attn, lora_a
        ab = "A" if leaf == "lora_a" else "B"
        key = f"{_PREFIX}h.{layer[2:]}.{module}.{dense}.lora_{ab}.weight"
        tensors[key] = np.ascontiguousarray(np.asarray(value, np.float32).T)
    return tensors


def save_adapter(
    folder: Path, spec: lora.LoraSpec, adapters: Params, *, base: str | None, force: bool = False
) -> Path:
    """Write the adapter folder (each file atomically); refuse to overwrite unless forced."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; an adapter is a folder")
    if is_adapter(folder) and not force:
        raise UserError(f"{folder} already holds an adapter (use --force to overwrite)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create folder {folder}: {exc.strerror}") from None
    tensors = peft_tensors(adapters)
    text = json.dumps(peft_config(spec, base), indent=2) + "\n"
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return folder


def load_adapter(folder: Path) -> tuple[lora.LoraSpec, Params]:
    """(spec, adapters in lora.py's orientation) of a PEFT LoRA folder, checked."""
    folder = Path(folder)
    if not is_adapter(folder):
        raise UserError(f"{folder} is not a LoRA adapter folder (no {CONFIG_FILE} in it)")
    config = read_json(folder / CONFIG_FILE)
    where = f"adapter {folder}"
    if not isinstance(config, dict):
        raise UserError(f"{where}: {CONFIG_FILE} is not a JSON object")
    spec = _spec(config, where)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{where} has no {WEIGHTS_FILE}")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights} is not a readable safetensors file ({exc})") from None
    adapters = _adapters(tensors, spec, where)
    return dataclasses.replace(spec, targets=targets_of(adapters)), adapters


def _spec(config: dict, where: str) -> lora.LoraSpec:
    if config.get("peft_type") != "LORA":
        raise UserError(f"{where} is a {config.get('peft_type')} adapter; gpt2 reads LORA ones")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "lora_bias": bool(config.get("lora_bias")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
    }
    for name, used in unsupported.items():
        if used:
            raise UserError(f"{where} uses {name}={config[name]!r}, which gpt2 does not apply")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not (isinstance(rank, int) and isinstance(alpha, int | float)):
        raise UserError(f"{where}: r and lora_alpha must be numbers, got {rank!r}, {alpha!r}")
    try:
        return lora.LoraSpec(rank, float(alpha), float(config.get("lora_dropout") or 0.0))
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _adapters(tensors: dict[str, np.ndarray], spec: lora.LoraSpec, where: str) -> Params:
    flat = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise UserError(f"{where} holds {key}, which is not a LoRA array of a GPT-2 layer")
        module, dense = match["target"].split(".")
        leaf = "lora_a" if match["ab"] == "A" else "lora_b"
        array = np.asarray(value, np.float32).T  # PEFT's [r, in] / [out, r] -> [in, r] / [r, out]
        r = array.shape[1] if leaf == "lora_a" else array.shape[0]
        if array.ndim != 2 or r != spec.rank:
            raise UserError(f"{where}: {key} has shape {value.shape}, not rank r={spec.rank}")
        flat[f"h_{match['layer']}/{module}/{dense}/{leaf}"] = np.ascontiguousarray(array)
    if not flat:
        raise UserError(f"{where} holds no LoRA arrays")
    unpaired = [n for n in flat if n[:-1] + ("b" if n.endswith("a") else "a") not in flat]
    if unpaired:
        raise UserError(f"{where}: {unpaired[0]} has no partner (lora_A needs lora_B)")
    return unflatten(flat)


def targets_of(adapters: Params) -> tuple[str, ...]:
    """The layers an adapter changes, in lora.TARGETS' names."""
    found = {".".join(name.split("/")[1:3]) for name in flatten(adapters)}
    return tuple(t for t in lora.TARGETS if t in found)


def check_fits(adapters: Params, spec: lora.LoraSpec, config: GPT2Config, where: str) -> None:
    """Every array of the adapter at a layer this model has, of this model's shape."""
    full = lora.LoraSpec(spec.rank, spec.alpha, spec.dropout, lora.TARGETS)
    expected = lora.adapter_shapes(config, full)
    for name, array in flatten(adapters).items():
        want = expected.get(name)
        if want is None:
            raise UserError(
                f"{where} was made for another model shape: it adapts {name}, and this model "
                f"has {config.n_layer} layers"
            )
        if tuple(array.shape) != want:
            raise UserError(
                f"{where} was made for another model shape: {name} is {tuple(array.shape)}, "
                f"this model needs {want}"
            )


def apply_adapter(config: GPT2Config, params: Params, folder: str | Path) -> Params:
    """The params with the adapter in `folder` merged into their kernels (W + scale * A @ B)."""
    spec, adapters = load_adapter(Path(folder))
    check_fits(adapters, spec, config, f"adapter {folder}")
    return lora.merge(params, adapters, spec.scale)
