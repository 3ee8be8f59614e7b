"""The on-disk cache sparsity-router builds models in, and how folders are published there.

The cache directory is ``$SPARSITY_ROUTER_CACHE`` or ``~/.cache/sparsity-router``. A folder
(a converted or derived model) is built under a temporary name, marked complete with
:data:`COMPLETE_MARKER`, then renamed into place while :func:`file_lock` is held, so racing
processes or a crash mid-way never leave a half-written folder behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

__all__ = [
    "CACHE_ENV",
    "COMPLETE_MARKER",
    "cache_dir",
    "eval_cache_dir",
    "file_lock",
]

#: The environment variable that moves the cache.
CACHE_ENV: Final = "SPARSITY_ROUTER_CACHE"
#: The file that marks a cached folder as completely written.
COMPLETE_MARKER: Final = ".complete"


def cache_dir() -> Path:
    """The folder for converted models and other caches (``$SPARSITY_ROUTER_CACHE``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsity-router"


def eval_cache_dir() -> Path:
    """The folder for offline-evaluation caches (feature tables, embeddings): ``<cache>/eval``."""
    return cache_dir() / "eval"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created, with its folder, if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
