"""Hugging Face GPT-2 safetensors <-> our param tree, both directions, with numpy only.

HF Conv1D weights are (in, out), the same as a Flax Dense kernel: names change, arrays don't.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from gpt2cli.atomic import atomic_write
from gpt2cli.config import GPT2Config
from gpt2cli.errors import UserError

HF_PREFIX = "transformer."
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# Buffers older checkpoints carry (the causal mask); not parameters.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_LEAF_NAMES = {"weight": "kernel", "bias": "bias"}

Params = dict  # nested {name: {... : np.ndarray}}


def name_map(config: GPT2Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """HF tensor name (no prefix) -> (param path, shape), for every parameter of `config`."""
    d, inner = config.n_embd, config.mlp_width
    names = {
        "wte.weight": (("wte", "embedding"), (config.vocab_size, d)),
        "wpe.weight": (("wpe", "embedding"), (config.n_positions, d)),
        "ln_f.weight": (("ln_f", "scale"), (d,)),
        "ln_f.bias": (("ln_f", "bias"), (d,)),
    }
    dense_shapes = {
        "attn.c_attn": (d, 3 * d),
        "attn.c_proj": (d, d),
        "mlp.c_fc": (d, inner),
        "mlp.c_proj": (inner, d),
    }
    for i in range(config.n_layer):
        block = f"h_{i}"
        for ln in ("ln_1", "ln_2"):
            names[f"h.{i}.{ln}.weight"] = ((block, ln, "scale"), (d,))
            names[f"h.{i}.{ln}.bias"] = ((block, ln, "bias"), (d,))
        for layer, (fan_in, fan_out) in dense_shapes.items():
            path = (block, *layer.split("."))
            names[f"h.{i}.{layer}.weight"] = ((*path, "kernel"), (fan_in, fan_out))
            names[f"h.{i}.{layer}.bias"] = ((*path, "bias"), (fan_out,))
    return names


def _list(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_arrays(
    found: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], where: str, noun: str
) -> None:
    """Raise one UserError naming every missing, unexpected or wrongly shaped array."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise UserError(f"{where} is missing {len(missing)} {noun}(s): {_list(missing)}")
    if unexpected:
        raise UserError(f"{where} has {len(unexpected)} unexpected {noun}(s): {_list(unexpected)}")
    wrong = [
        f"{name} {tuple(found[name].shape)} (expected {shape})"
        for name, shape in expected.items()
        if tuple(found[name].shape) != shape
    ]
    if wrong:
        raise UserError(f"{where} has wrong shapes: {_list(wrong, 3)}")


def params_from_hf(tensors: Mapping[str, np.ndarray], config: GPT2Config) -> Params:
    """Strictly map HF tensors onto the param tree; every problem is named."""
    stripped: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        short = name.removeprefix(HF_PREFIX)
        if short.endswith(_BUFFER_SUFFIXES):
            continue
        stripped[short] = array

    head = stripped.pop("lm_head.weight", None)
    expected = name_map(config)
    check_arrays(
        stripped, {name: shape for name, (_, shape) in expected.items()}, "checkpoint", "tensor"
    )
    if head is not None and not np.array_equal(head, stripped["wte.weight"]):
        raise UserError("lm_head.weight differs from wte.weight: untied LM heads are not supported")

    params: Params = {}
    for name, (path, _) in expected.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(stripped[name])
    return params


def params_to_hf(params: Params, config: GPT2Config) -> dict[str, np.ndarray]:
    """Param tree -> HF tensors named as transformers' save_pretrained writes them."""
    tensors = {}
    for name, (path, _) in name_map(config).items():
        node = params
        for key in path:
            node = node[key]
        tensors[HF_PREFIX + name] = np.ascontiguousarray(node)
    return tensors


# ---- files --------------------------------------------------------------------------


def _read_one(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except SafetensorError as exc:
        raise UserError(
            f"{path} is not a readable safetensors file, likely a corrupt or incomplete "
            f"download ({exc}); delete it and download again"
        ) from exc
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF folder: one model.safetensors or shards listed in the index."""
    single, index = folder / SINGLE_FILE, folder / SHARD_INDEX
    if single.is_file():
        return _read_one(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{index} is not a valid safetensors index: {exc}") from exc
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise UserError(
                f"{index} is not a valid safetensors index: weight_map must map tensor names "
                f"to shard file names, got {weight_map!r:.60}"
            )
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise UserError(f"shard {shard} listed in {index} is missing")
            tensors.update(_read_one(folder / shard))
        return tensors
    if any(
        (folder / name).is_file()
        for name in ("pytorch_model.bin", "model.pt", "flax_model.msgpack")
    ):
        raise UserError(
            f"{folder} has only pickle/msgpack weights (pytorch_model.bin); gpt2 reads "
            "safetensors only, because pickle files can run code when loaded. "
            "Convert them with transformers' save_pretrained(safe_serialization=True)"
        )
    raise UserError(f"{folder} has no {SINGLE_FILE} (or {SHARD_INDEX})")


def load_hf_folder(folder: Path) -> tuple[GPT2Config, Params]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = GPT2Config.from_json_file(config_file)
    return config, params_from_hf(read_safetensors(folder), config)


def _save_safetensors(tensors: dict, tmp: Path) -> None:
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
    except SafetensorError as exc:  # its I/O errors (a full disk) are not OSErrors
        raise OSError(str(exc)) from None


def save_hf_folder(
    folder: Path,
    config: GPT2Config,
    params: Params,
    force: bool = False,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write config.json + model.safetensors that transformers loads, and the `extra` files
    (name -> text: the tokenizer's, tokenizer.hf_files)."""
    extra = extra or {}
    targets = [folder / "config.json", folder / SINGLE_FILE, *(folder / name for name in extra)]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists (use --force to overwrite)")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create folder {folder}: {exc.strerror}") from exc
    tensors = params_to_hf(params, config)
    config_text = json.dumps(config.to_hf(), indent=2) + "\n"
    try:
        atomic_write(folder / SINGLE_FILE, lambda tmp: _save_safetensors(tensors, tmp))
        for name, text in {"config.json": config_text, **extra}.items():
            atomic_write(
                folder / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8")
            )
    except BaseException:
        if created:  # leave no half-made folder behind (a full disk, Ctrl-C)
            for file in targets:
                file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return folder
