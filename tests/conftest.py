"""Shared fixtures: the golden files made by scripts/make_fixtures.py with HF transformers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Tests run tiny models, where XLA's compile time dominates: compile with less optimisation
# (about 30% off the suite). It must be set before jax is imported; an explicit XLA_FLAGS wins.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# On a GPU, JAX takes 75% of its memory at start: the CLI processes that tests start beside
# this one would find none left.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# A checkout run (PYTHONPATH=., as on a GPU machine): the Python processes that tests start in
# other folders must find the package too.
ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTHONPATH"):
    paths = os.environ["PYTHONPATH"].split(os.pathsep)
    os.environ["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in paths if p)


def pytest_addoption(parser):
    parser.addoption(
        "--simulate-gpu",
        action="store_true",
        help="choose a GPU's kernels on this CPU (see tests/gpu_simulation.py)",
    )


def pytest_configure(config):
    if config.getoption("--simulate-gpu"):
        from tests import gpu_simulation

        gpu_simulation.install()


FIXTURES = Path(__file__).parent / "fixtures"
TINY_A = FIXTURES / "tiny-a"  # transformers-5 layout, real GPT-2 vocab
TINY_B = FIXTURES / "tiny-b"  # the Hub's old layout, with attn.bias buffers


@pytest.fixture(scope="session")
def golden() -> dict:
    """golden.json metadata plus every golden.npz array under 'arrays'."""
    meta = json.loads((FIXTURES / "golden.json").read_text())
    with np.load(FIXTURES / "golden.npz", allow_pickle=False) as data:
        meta["arrays"] = {name: data[name] for name in data.files}
    return meta


@pytest.fixture(scope="session")
def tiny_a():
    from gpt2cli.weights import load_hf_folder

    return load_hf_folder(TINY_A)


@pytest.fixture(scope="session")
def tiny_b():
    from gpt2cli.weights import load_hf_folder

    return load_hf_folder(TINY_B)


def gpt2_exe() -> str:
    """The installed console script next to this interpreter, else (a checkout run with
    PYTHONPATH=., as on a GPU machine) a launcher script that runs the same entry point. Under
    --simulate-gpu, always a launcher that simulates the GPU's kernels in the CLI too."""
    from tests import gpu_simulation

    exe = shutil.which("gpt2", path=str(Path(sys.executable).parent))
    if exe and not gpu_simulation.ACTIVE:
        return exe
    setup = "from tests import gpu_simulation; gpu_simulation.install()\n"
    script = (
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        f"{setup if gpu_simulation.ACTIVE else ''}from gpt2cli.cli.app import main\n"
        # guarded as a console script is: a spawned worker (gpt2 prepare) imports this file
        'if __name__ == "__main__":\n    main()\n'
    )
    # One launcher per script text (interpreter, checkout, simulation), written under a
    # temporary name and renamed into place: parallel test workers (pytest -n) never run a
    # half-written one.
    digest = hashlib.sha256(script.encode()).hexdigest()[:12]
    launcher = Path(tempfile.gettempdir()) / f"gpt2-launcher-{os.getuid()}-{digest}" / "gpt2"
    if not launcher.exists():
        launcher.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=launcher.parent, delete=False) as f:
            f.write(script)
        os.chmod(f.name, 0o755)
        os.replace(f.name, launcher)
    return str(launcher)


def run_gpt2(
    *args: str | bytes, env: dict | None = None, input: str | bytes | None = None, cwd=None
):
    """Run the real `gpt2` console script in a subprocess (bytes input: bytes output)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [gpt2_exe(), *args],
        capture_output=True,
        text=not isinstance(input, bytes),
        env=full_env,
        input=input,
        cwd=cwd,
        timeout=300,
    )


def cli(*args: str, env: dict | None = None, input: str | None = None):
    """Run `gpt2` in this process (Typer's CliRunner): fast, for everything but signals and
    pipes, which need `run_gpt2`."""
    from typer.testing import CliRunner

    from gpt2cli.cli.app import app

    return CliRunner().invoke(app, list(args), env=env, input=input)


@pytest.fixture(scope="session")
def serve_tiny():
    """`gpt2 serve` on tiny-a (a free 127.0.0.1 port, API key `test-key`), shared by the server
    tests and stopped (SIGTERM, exit 0) at the end."""
    from tests.helpers_serve import SERVE_KEY, ServerProcess

    server = ServerProcess(
        "--max-batch", "4", "--max-queue", "16", "--api-key", SERVE_KEY, "--decode-chunk", "1"
    )
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0
