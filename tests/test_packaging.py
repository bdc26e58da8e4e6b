"""The wheel carries the tokenizer files: build it, install it in a fresh venv, use it."""

import shutil
import subprocess
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
    subprocess.run([uv, "venv", "-q", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run([uv, "pip", "install", "-q", "--python", str(python), str(wheel)], check=True)

    help_text = subprocess.run(
        [tmp_path / "venv" / "bin" / "gpt2", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
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
