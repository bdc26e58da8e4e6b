"""Time `gpt2 convert` of a HF folder to .npz, and loading that .npz back.

    uv run python benchmarks/convert_load.py /path/to/gpt2-124m-random-hf-folder

The random 124M folder comes from `scripts/make_fixtures.py --bench-dir DIR` (peer venv).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt2cli.checkpoint import load_npz


def main(folder: str) -> None:
    gpt2 = shutil.which("gpt2", path=str(Path(sys.executable).parent)) or "gpt2"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.npz"
        start = time.perf_counter()
        subprocess.run([gpt2, "convert", folder, str(out)], check=True, capture_output=True)
        convert_s = time.perf_counter() - start
        start = time.perf_counter()
        config, _ = load_npz(out)
        load_s = time.perf_counter() - start
        size_mib = out.stat().st_size / 2**20
    print(f"model           : {folder} ({config.num_params():,} parameters, {size_mib:.0f} MiB)")
    print(f"gpt2 convert    : {convert_s:.2f} s (whole command, process start included)")
    print(f"load_npz        : {load_s:.2f} s")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
