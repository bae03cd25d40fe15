"""Where clbench keeps downloaded data, weights and other caches: one folder, never the repository."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$CLBENCH_CACHE`` if set, else ``~/.cache/clbench``; created on demand."""
    root = Path(os.environ.get("CLBENCH_CACHE") or Path.home() / ".cache" / "clbench").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def data_dir() -> Path:
    """``$CLBENCH_DATA`` if set, else ``<cache>/data``."""
    env = os.environ.get("CLBENCH_DATA")
    root = Path(env).expanduser() if env else cache_dir() / "data"
    root.mkdir(parents=True, exist_ok=True)
    return root


def memory_store(uri: str) -> bool:
    """Whether ``uri`` is an sqlite store held in memory (``sqlite:///:memory:``, ``sqlite://``, a ``file:``
    URI in memory mode): it is gone when the process ends, and every result with it."""
    if not uri.startswith("sqlite:"):
        return False
    path = uri.removeprefix("sqlite:").removeprefix("//").removeprefix("/")
    return path in ("", ":memory:") or path.startswith("file::memory:") or "mode=memory" in path
