"""Writes that survive a crash: data reaches the disk before a rename publishes it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync(path: Path) -> None:
    """Makes a written file, or a directory's entries, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: Path, data: bytes) -> None:
    """`path` holds all of `data` or what it held before, whenever a crash comes."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write_synced(Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync(path.parent)
