"""Whole blobs of a remote store on local disk (`root/<blob id>/`), least recently used out
first once they pass `capacity` bytes: what a worker keeps in front of the store, so that an
adapter it serves or trains on again is read from its own disk.

A blob enters through a staging directory and a rename, so a directory under its id is always
whole; two threads that fetch the same blob at once both fetch, and the second keeps the
first's. Eviction keeps the blob that came in last, and blobs used in the last `in_use_s`
seconds, which a reader may still be reading (a reader loads a version's two small files
once, at once).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cotune.adapters.blob_store import checked_blob_id, is_blob_id


class BlobCache:
    def __init__(self, root: Path, capacity: int, in_use_s: float = 60.0):
        self.root, self.capacity, self.in_use_s = Path(root), capacity, in_use_s
        self.staging = self.root / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def get(self, blob_id: str) -> Path | None:
        """The blob's directory, marked as just used; None when it is not here."""
        path = self.root / checked_blob_id(blob_id)
        try:
            os.utime(path)  # the directory's mtime is its last use
        except FileNotFoundError:
            return None
        return path

    def put(self, blob_id: str, fill: Callable[[Path], None]) -> Path:
        """The blob's directory, after `fill(directory)` wrote its files (unless another
        thread put it first); then what passes the capacity goes."""
        final = self.root / checked_blob_id(blob_id)
        tmp = Path(tempfile.mkdtemp(dir=self.staging))
        try:
            fill(tmp)
            try:
                os.rename(tmp, final)
            except OSError:  # another thread put it first: its copy is as good
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.get(blob_id)
        self._evict(keep=final)
        return final

    def discard(self, blob_id: str) -> None:
        shutil.rmtree(self.root / checked_blob_id(blob_id), ignore_errors=True)

    def sweep(self, keep: set[str]) -> None:
        """Removes staging debris and the blobs not in `keep` (their versions were deleted)."""
        for debris in self.staging.iterdir():
            shutil.rmtree(debris, ignore_errors=True)
        for entry in self.root.iterdir():
            if is_blob_id(entry.name) and entry.name not in keep:
                self.discard(entry.name)

    def _evict(self, keep: Path) -> None:
        with self._lock:
            entries = []
            for entry in self.root.iterdir():
                if is_blob_id(entry.name):
                    try:
                        used = entry.stat().st_mtime
                        size = sum(f.stat().st_size for f in entry.iterdir())
                    except FileNotFoundError:  # discarded meanwhile
                        continue
                    entries.append((used, size, entry))
            total = sum(size for _, size, _ in entries)
            recent = time.time() - self.in_use_s
            for used, size, entry in sorted(entries, key=lambda e: e[0]):
                if total <= self.capacity:
                    break
                if entry != keep and used < recent:
                    shutil.rmtree(entry, ignore_errors=True)
                    total -= size
