"""The run folder: its settings (run.json), metrics.jsonl, and resumable checkpoints.

A checkpoint `ckpt-0000500.npz` holds the params, every optimizer-state leaf and a JSON header
(step, model config). It is written to a temporary file and renamed into place, so a crash or
`kill -9` during a save leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gpt2cli.atomic import atomic_write, remove_stale_temps, write_npz, write_text
from gpt2cli.checkpoint import flatten, unflatten
from gpt2cli.config import GPT2Config
from gpt2cli.errors import UserError
from gpt2cli.headers import check_header, read_json

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
RUN_FORMAT = "gpt2cli-run"
CKPT_FORMAT = "gpt2cli-train-ckpt"
VERSION = 1  # of a checkpoint's header
RUN_VERSION = 2  # run.json's shape; gpt2 also reads version 1 (see plan.py)
_HEADER = "__train__"
_CKPT = re.compile(r"^ckpt-(\d+)\.npz$")


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    # ---- run.json ----------------------------------------------------------------------

    @classmethod
    def check_new(cls, path: Path) -> None:
        """Refuse a folder that already holds a run, or a file where the folder would go.

        A run.json without any checkpoint is a start that died (killed before its first
        save): nothing in it can be resumed, so a new run may take the folder over.
        """
        path = Path(path)
        if (path / RUN_FILE).exists() and cls(path).checkpoints():
            raise UserError(
                f"{path} already holds a run; continue it with --resume {path}, "
                "or choose another --out"
            )
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} is a file; give a folder for the run")

    @classmethod
    def create(cls, path: Path, spec: dict[str, Any]) -> tuple[RunFolder, RunLock]:
        """Make the folder, hold its lock, and write run.json."""
        path = Path(path)
        cls.check_new(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        lock = run.lock()
        try:
            cls.check_new(path)  # again, now that no other process can be writing it
            (path / METRICS_FILE).unlink(missing_ok=True)  # a dead start's lines
            run.write_spec(spec)
        except BaseException:
            lock.release()
            raise
        return run, lock

    def lock(self) -> RunLock:
        return RunLock.take(self.path / LOCK_FILE, self.path)

    def remove_unstarted(self) -> None:
        """Delete what a run that never saved a checkpoint wrote, so a retry starts clean."""
        if self.checkpoints():
            return
        for name in (RUN_FILE, METRICS_FILE):
            (self.path / name).unlink(missing_ok=True)

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"--resume {path}: no such folder")
        if not (path / RUN_FILE).is_file():
            raise UserError(f"--resume {path}: not a training run (no {RUN_FILE} in it)")
        return cls(path)

    def write_spec(self, spec: dict[str, Any]) -> None:
        spec = {"format": RUN_FORMAT, "version": RUN_VERSION, **spec}
        text = json.dumps(spec, indent=2, allow_nan=False) + "\n"
        write_text(self.path / RUN_FILE, text)

    def spec(self) -> dict[str, Any]:
        file = self.path / RUN_FILE
        header = read_json(file)
        # Version 1 is still read: plan.py turns its shape into version 2's.
        old = isinstance(header, dict) and header.get("version") == 1
        return check_header(
            header,
            file,
            format=RUN_FORMAT,
            version=1 if old else RUN_VERSION,
            what="a gpt2 training run file",
        )

    # ---- metrics -----------------------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        file = self.path / METRICS_FILE
        if not file.is_file():
            return []
        return [r for r in map(_record, file.read_text(encoding="utf-8").splitlines()) if r]

    def truncate_metrics(self, step: int) -> None:
        """Drop records after `step`: a resumed run logs those steps again."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        write_text(self.path / METRICS_FILE, text)

    def plot(self) -> Path:
        """Draw the training and validation loss curves, and the task's acc_norm if the run scored
        one, into loss.png (needs matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        records = self.metrics()
        fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(self.path.name)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        task = [(r["step"], r["task_acc_norm"]) for r in records if "task_acc_norm" in r]
        if task:  # --eval-task: accuracy on its own axis, on the right
            acc_ax = ax.twinx()
            acc_ax.plot(*zip(*task, strict=True), "s-", color="tab:green", label="task acc_norm")
            acc_ax.set_ylabel("task accuracy (acc_norm)")
            acc_ax.set_ylim(0, 1)
            acc_ax.legend(loc="upper right")
        path = self.path / "loss.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)
        return path

    # ---- checkpoints -------------------------------------------------------------------

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (temporary files of a broken save are skipped)."""
        found = []
        for file in self.path.iterdir():
            match = _CKPT.match(file.name)
            if match:
                found.append((int(match.group(1)), file))
        return sorted(found)

    def remove_partial(self) -> None:
        """Delete temporary files left by a save that was killed half-way."""
        remove_stale_temps(self.path)

    def latest(self) -> tuple[int, Path] | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, config: GPT2Config, params: Any, opt_state: Any, keep: int) -> Path:
        """Write ckpt-<step>.npz atomically, then delete all but the newest `keep`."""
        arrays = {f"params/{k}": np.asarray(v) for k, v in flatten(params).items()}
        leaves = jax.tree.leaves(opt_state)
        arrays.update({f"opt/{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
        header = {
            "format": CKPT_FORMAT,
            "version": VERSION,
            "step": step,
            "config": config.to_hf(),
            "opt_leaves": len(leaves),
        }
        arrays[_HEADER] = np.array(json.dumps(header))
        path = self.path / f"ckpt-{step:07d}.npz"

        write_npz(path, arrays)
        for _, old in self.checkpoints()[:-keep] if keep > 0 else []:
            old.unlink(missing_ok=True)
        return path


def load_checkpoint(path: Path, params_like: Any, opt_like: Any) -> tuple[int, Any, Any]:
    """(step, params, opt_state) of a checkpoint, checked against the run's shapes."""
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data[_HEADER]))
            check_header(
                header, path, format=CKPT_FORMAT, version=VERSION, what="a training checkpoint"
            )
            flat = {k[len("params/") :]: data[k] for k in data.files if k.startswith("params/")}
            opt = [data[f"opt/{i:05d}"] for i in range(header["opt_leaves"])]
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as exc:
        raise UserError(f"checkpoint {path} is unreadable ({exc})") from None

    expected = {k: tuple(v.shape) for k, v in flatten(params_like).items()}
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if set(expected) != set(got):
        missing = sorted(set(expected) - set(got))[:3]
        raise UserError(
            f"checkpoint {path} was made with another model shape (arrays differ: {missing} ...)"
        )
    for name, shape in expected.items():
        if got[name] != shape:
            raise UserError(
                f"checkpoint {path} was made with another model shape: {name} is {got[name]}, "
                f"this run's model needs {shape}"
            )
    opt_leaves, treedef = jax.tree.flatten(opt_like)
    if len(opt) != len(opt_leaves) or any(
        a.shape != tuple(b.shape) for a, b in zip(opt, opt_leaves, strict=True)
    ):
        raise UserError(
            f"checkpoint {path}: its optimizer state does not match this run's optimizer settings"
        )
    return int(header["step"]), unflatten(flat), jax.tree.unflatten(treedef, opt)


def _record(line: str) -> dict[str, Any] | None:
    """One metrics line; None for a line a crash cut short (kill -9 during an append)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class RunLock:
    """An exclusive hold on a run folder, so two processes never write one run.

    `flock` on `.lock`: taken atomically, and released by the system on any exit (even
    `kill -9`), so a dead holder never blocks anyone. The file names the holder (pid and host)
    for the message a second process gets; the holder deletes it when it lets go.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def take(cls, path: Path, folder: Path) -> RunLock:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise UserError(
                    f"{folder} is in use by another gpt2 train ({holder}); "
                    "wait for it to finish or stop it"
                ) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder deleted the file as we opened it: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        if self._fd < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1
