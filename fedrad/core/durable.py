"""Durable file writes shared by every component: temporary file, fsync, atomic rename.

A crash at any point leaves either the old file or the new one, never half of either; run
directories, caches, privacy ledgers and keys all rely on it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path


def replace_atomically(
    path: Path, write: Callable[[Path], object], *, mode: int | None = None
) -> None:
    """Let ``write`` fill a temporary file beside ``path``, fsync it, then rename it over ``path``.

    ``mode`` sets the file's permissions before it becomes visible (e.g. 0o600 for keys; the
    temporary file is created 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
    with suppress(OSError):  # make the rename itself durable where folders can be fsynced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` durably and atomically."""
    replace_atomically(path, lambda tmp: tmp.write_bytes(data), mode=mode)
