"""Regenerate completions/ from the app: `uv run python scripts/make_completions.py`.

Completion only works through the console script's name, so this runs the installed `gpt2`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SHELLS = {"bash": "gpt2.bash", "zsh": "_gpt2", "fish": "gpt2.fish"}


def completion_script(shell: str) -> str:
    gpt2 = shutil.which("gpt2", path=str(Path(sys.executable).parent)) or "gpt2"
    env = {**os.environ, "_GPT2_COMPLETE": f"source_{shell}"}
    return subprocess.run([gpt2], env=env, capture_output=True, text=True, check=True).stdout


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "completions"
    out.mkdir(exist_ok=True)
    for shell, name in SHELLS.items():
        (out / name).write_text(completion_script(shell), encoding="utf-8")
        print(out / name)


if __name__ == "__main__":
    main()
