"""The wheel carries the tokenizer files: build it, install it in a fresh venv, use it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_and_tokenizes_offline(tmp_path):
    uv = shutil.which("uv")
    if uv is None:  # CI installs it; a GPU machine running the checkout has none
        pytest.skip("uv is needed to build and install the wheel")
    subprocess.run(
        [uv, "build", "--wheel", "-o", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("gpt2cli-*.whl"))
    # What the README's `uv tool install --compile-bytecode .` does, into this test's folders.
    tools = {"UV_TOOL_DIR": str(tmp_path / "tools"), "UV_TOOL_BIN_DIR": str(tmp_path / "bin")}
    subprocess.run(
        [uv, "tool", "install", "-q", "--compile-bytecode", str(wheel)],
        check=True,
        env={**os.environ, **tools},
    )
    python = tmp_path / "tools" / "gpt2cli" / "bin" / "python"
    gpt2 = tmp_path / "bin" / "gpt2"
    # Start-up stays fast where PYTHONDONTWRITEBYTECODE=1: the bytecode is there already.
    assert list((tmp_path / "tools").rglob("gpt2cli/cli/__pycache__/app.cpython-*.pyc"))

    help_text = subprocess.run([gpt2, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert help_text.returncode == 0 and "convert" in help_text.stdout
    code = (
        "from gpt2cli.tokenizer import bundled; t = bundled(); ids = t.encode('Hello world'); "
        "print(ids, t.decode(ids), t.encode('<|endoftext|>'))"
    )
    out = subprocess.run(
        [python, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert out.stdout.strip() == "[15496, 995] Hello world [50256]", out.stderr
    demo = subprocess.run(
        [gpt2, "generate", "ROMEO:", "-m", "shakespeare", "-n", "5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert demo.returncode == 0 and demo.stdout.startswith("ROMEO:"), demo.stderr


def test_a_checkout_runs_the_command_as_a_module():
    """`PYTHONPATH=. python3 -m gpt2cli`, where nothing is installed (a GPU machine), is the
    gpt2 command."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "gpt2cli"]
    help_text = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env)
    assert help_text.returncode == 0 and "generate" in help_text.stdout, help_text.stderr
    demo = subprocess.run(
        [*run, "generate", "ROMEO:", "-m", "shakespeare", "-n", "5"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert demo.returncode == 0 and demo.stdout.startswith("ROMEO:"), demo.stderr
