"""The one atomic writer: no temp file survives an error, Ctrl-C or SIGTERM; one left by
kill -9 is removed by the next write to that path."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap

import pytest

from gpt2cli.atomic import atomic_write
from gpt2cli.errors import UserError
from tests.conftest import TINY_A, cli

HANGING_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from gpt2cli.atomic import atomic_write
    from gpt2cli.cli import interrupts

    interrupts.install()  # what the console script does

    def write(tmp):
        tmp.write_bytes(b"half")
        print("writing", flush=True)
        time.sleep(120)

    try:
        atomic_write(Path(sys.argv[1]), write)
    except KeyboardInterrupt as exc:
        sys.exit(interrupts.exit_code(exc))
    """
)


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_a_write_leaves_no_temp_file(tmp_path, signum, code):
    proc = subprocess.Popen([sys.executable, "-c", HANGING_WRITER, str(tmp_path / "out.npz")],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "writing"
    assert list(tmp_path.glob(".out.npz.*.tmp"))
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == code
    assert list(tmp_path.iterdir()) == []


def test_the_next_write_removes_temp_files_of_dead_writers_only(tmp_path):
    dead = tmp_path / f".out.npz.{_dead_pid()}.k3j4h5.tmp"  # left by kill -9
    alive = tmp_path / f".out.npz.{subprocess.os.getpid()}.a1b2c3.tmp"  # a writer at work
    other = tmp_path / f".other.npz.{_dead_pid()}.zz.tmp"  # another file's: not ours to judge
    for file in (dead, alive, other):
        file.write_bytes(b"x")
    atomic_write(tmp_path / "out.npz", lambda tmp: tmp.write_bytes(b"new"))
    assert (tmp_path / "out.npz").read_bytes() == b"new"
    assert not dead.exists() and alive.exists() and other.exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    def full(tmp):
        tmp.write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=r"cannot write .*out.npz: No space left on device"):
        atomic_write(tmp_path / "out.npz", full)
    assert list(tmp_path.iterdir()) == []


def test_convert_to_hf_onto_a_full_disk_removes_the_folder_it_made(tmp_path, monkeypatch):
    import gpt2cli.weights

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gpt2cli.weights, "save_file", full)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    done = cli("convert", str(TINY_A), str(tmp_path / "export"), "--to", "hf")
    assert done.exit_code == 1
    assert "No space left on device" in done.output
    assert len(done.output.strip().splitlines()) == 1, done.output
    assert not (tmp_path / "export").exists()
