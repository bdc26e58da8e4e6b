"""JAX's persistent compilation cache in the user's own cache folder.

A second `gpt2 generate` in a new process then loads its compiled programs instead of
compiling them again. The folder holds executable code, so it lives in the user's private
cache folder (created 0700), never a shared one. `GPT2_NO_COMPILE_CACHE=1` turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path

DISABLE_ENV = "GPT2_NO_COMPILE_CACHE"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpt2cli" / "jax"


def enable() -> Path | None:
    """Point JAX at the cache folder (before the first compile); None when turned off."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    import jax

    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return None  # a read-only home only costs compile time
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
