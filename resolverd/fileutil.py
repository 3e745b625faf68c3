"""Crash-safe file replacement, shared by every state file resolverd writes."""

from __future__ import annotations

import contextlib
import os
import tempfile


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so a reader (or a restart after kill -9) sees the
    old content or the new, never a mix: temp file in the same folder, fsync,
    rename, fsync of the folder."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
