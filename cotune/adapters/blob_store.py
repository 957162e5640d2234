"""Version blobs on local disk: one directory per published version, named by a random id.

A blob is written under `.staging/`, fsynced, then renamed into place, so a crash at any moment
leaves either the whole blob directory or only staging debris. The registry publishes a blob
before inserting the row that references it and removes a blob after committing the row's
deletion; `sweep` at startup removes what a crash between those two steps left behind.

Imports neither torch nor the registry: the store knows directories, not adapters.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from cotune.adapters.durable import fsync

# PEFT's file names (as in peft_format); a version is exactly these two files.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FILES = (CONFIG_NAME, WEIGHTS_NAME)

_BLOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)

    def publish(self, files: Path) -> tuple[str, Path]:
        """Copies adapter_config.json and adapter_model.safetensors from directory `files` into
        a new blob; returns (blob_id, its directory). Nothing else in `files` is copied."""
        files = Path(files)
        missing = [name for name in FILES if not (files / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{files} has no {' or '.join(missing)}; accepted: a directory with "
                f"{CONFIG_NAME} and {WEIGHTS_NAME}")
        tmp = Path(tempfile.mkdtemp(dir=self.staging))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a version is for any reader
            for name in FILES:
                shutil.copyfile(files / name, tmp / name)
                fsync(tmp / name)
            fsync(tmp)
            blob_id = uuid.uuid4().hex
            final = self.root / blob_id
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync(self.root)  # the rename itself is durable before the registry references it
        return blob_id, final

    def path(self, blob_id: str) -> Path:
        return self.root / _checked(blob_id)

    def remove(self, blob_id: str) -> None:
        """Removes a blob; one already gone is no error (a sweep may have removed it)."""
        shutil.rmtree(self.path(blob_id), ignore_errors=True)

    def sweep(self, keep: set[str]) -> list[str]:
        """Removes staging debris and every blob not in `keep`; returns the removed blob ids.
        Called at startup, when no publish is in flight, with the ids the database references."""
        for debris in self.staging.iterdir():
            shutil.rmtree(debris, ignore_errors=True)
        removed = sorted(entry.name for entry in self.root.iterdir()
                         if _BLOB_ID.fullmatch(entry.name) and entry.name not in keep)
        for blob_id in removed:
            self.remove(blob_id)
        return removed


def _checked(blob_id: str) -> str:
    # checked before any path is built from it: an id is never '..' or a path
    if not isinstance(blob_id, str) or not _BLOB_ID.fullmatch(blob_id):
        raise ValueError(f"invalid blob id {blob_id!r}; accepted: 32 lowercase hex digits")
    return blob_id
