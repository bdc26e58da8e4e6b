"""The package's layers (pyproject's [tool.importlinter] contracts) hold, and each contract
fails when a forbidden import is added to a copy of the package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_the_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("model.py", "from gpt2cli import hub", "The model core imports no file format"),
        ("engine.py", "from gpt2cli.training import trainer", "Generation never imports training"),
        ("training/loop.py", "from gpt2cli.serve import app", "Commands sit above serving"),
        ("config.py", "import rich", "Only the commands and the progress helpers"),
        ("tokenizer.py", "from gpt2cli import generate", "No import cycle"),
        ("lens.py", "from gpt2cli import engine", "The lens reads the model"),
        ("hooks.py", "from gpt2cli import checkpoint", "The model core imports no file format"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    shutil.copytree(ROOT / "gpt2cli", tmp_path / "gpt2cli", ignore=shutil.ignore_patterns("assets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    source = tmp_path / "gpt2cli" / module
    source.write_text(source.read_text() + f"\n{line}  # added by the test\n")
    result = lint_imports(tmp_path, pythonpath=tmp_path)
    assert result.returncode != 0, result.stdout
    broken = [row for row in result.stdout.splitlines() if row.endswith(" BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout
