"""The .npz checkpoint: flat "/"-joined param keys plus a JSON header with config and version."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from gpt2cli.atomic import write_npz
from gpt2cli.config import GPT2Config
from gpt2cli.errors import UserError
from gpt2cli.headers import check_header
from gpt2cli.weights import Params, check_arrays, name_map

FORMAT = "gpt2cli-npz"
VERSION = 1
HEADER_KEY = "__gpt2cli__"  # a 0-d unicode array holding the JSON header


def flatten(params: Params, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, Any]) -> Params:
    params: Params = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return params


def nonfinite(params: Params) -> list[str]:
    """Names of the arrays holding NaN or infinity (a diverged or corrupted model)."""
    return [
        name
        for name, array in flatten(params).items()
        if not np.isfinite(np.asarray(array, np.float32)).all()
    ]


def describe_nonfinite(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
    return f"non-finite values in {len(names)} array{'s' * (len(names) != 1)} ({shown})"


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    return {"/".join(path): shape for path, shape in name_map(config).values()}


def save_npz(
    path: str | Path,
    config: GPT2Config,
    params: Params,
    *,
    force: bool = False,
    compressed: bool = False,
) -> Path:
    """Write atomically to exactly `path` (no ".npz" appended); refuse to overwrite unless forced."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name such as {path / 'model.npz'}")
    if path.exists() and not force:
        raise UserError(f"{path} already exists (use --force to overwrite)")
    arrays, dtypes = {}, {}
    for name, value in flatten(params).items():
        array = np.asarray(value)
        if array.dtype.kind not in "fiu":  # bfloat16: store its bits, remember the dtype
            dtypes[name] = str(array.dtype)
            array = array.view(np.uint16)
        arrays[name] = array
    header = {"format": FORMAT, "version": VERSION, "config": config.to_hf(), "dtypes": dtypes}
    arrays[HEADER_KEY] = np.array(json.dumps(header))

    write_npz(path, arrays, compressed=compressed)
    return path


def _read_header(data: np.lib.npyio.NpzFile, path: Path) -> dict:
    if HEADER_KEY not in data.files:
        raise UserError(f"{path} is not a gpt2 checkpoint (no {HEADER_KEY} header)")
    try:
        header = json.loads(str(data[HEADER_KEY]))
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} has an unreadable header: {exc}") from exc
    return check_header(header, path, format=FORMAT, version=VERSION, what="a gpt2 checkpoint")


def load_npz(path: str | Path) -> tuple[GPT2Config, Params]:
    """Load and validate a checkpoint: every array present, of the right shape, no pickles."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_file():  # /dev/null, a pipe
        raise UserError(f"{path} is not a regular file (expected a .npz checkpoint)")
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle anything else
        raise UserError(f"{path} is not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = _read_header(data, path)
            if not isinstance(header.get("config"), dict):
                raise UserError(f"{path} has no model config in its header")
            config = GPT2Config.from_hf(header["config"])
            names = [n for n in data.files if n != HEADER_KEY]
            flat = {name: data[name] for name in names}
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UserError(f"{path} is not a readable .npz file ({exc})") from exc
    except ValueError as exc:  # numpy refuses pickled object arrays with allow_pickle=False
        raise UserError(f"{path} holds pickled objects, which gpt2 never loads ({exc})") from exc

    check_arrays(flat, expected_shapes(config), str(path), "array")
    for name, dtype in header.get("dtypes", {}).items():
        flat[name] = flat[name].view(_dtype(dtype))
    return config, unflatten(flat)


def _dtype(name: str) -> np.dtype:
    import ml_dtypes  # ships with jax; knows bfloat16

    return np.dtype(getattr(ml_dtypes, name))
