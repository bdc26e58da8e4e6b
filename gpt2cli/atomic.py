"""Write a file so that a crash never leaves it half-written: temp file, fsync, rename.

The temporary file sits beside the target as `.<name>.<pid>.<random>.tmp`. It is removed on
every exit Python sees (an error, Ctrl-C, SIGTERM: the CLI turns SIGTERM into an interrupt);
one left by `kill -9` or a power cut is removed by the next write to that path, once its
writer's pid is gone.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from gpt2cli.errors import UserError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    remove_stale_temps(path.parent, path.name)
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
    except FileNotFoundError:
        if path.parent.is_dir():  # /proc, /sys: folders that take no new files
            raise UserError(f"cannot write {path}: {path.parent} takes no new files") from None
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist") from None
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror} ({path.parent})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make 0600 files
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk, a quota, an I/O error
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    _fsync_folder(path.parent)


def write_npz(path: Path, arrays: dict, *, compressed: bool = False) -> None:
    """Write arrays as a .npz at exactly `path`, atomically (checkpoints, run states)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz"
            (np.savez_compressed if compressed else np.savez)(f, **arrays)

    atomic_write(path, write)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_stale_temps(folder: Path, name: str | None = None) -> None:
    """Delete temporary files (of `name`, or of any file) whose writing process has died."""
    try:
        candidates = list(Path(folder).glob(f".{name or '*'}.*.tmp"))
    except OSError:
        return
    for tmp in candidates:
        match = _TEMP.match(tmp.name)
        if match and (name is None or match["name"] == name) and not _alive(int(match["pid"])):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
