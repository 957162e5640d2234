"""Version blobs: the two PEFT files of each published version, under a random id. The
interface, its local directory (LocalBlobStore) and, for workers on several nodes, an S3
bucket (s3_blob_store); `stores.open_stores` picks one by URL.

The registry publishes a blob before inserting the row that references it and removes a blob
after committing the row's deletion; `sweep` at start-up removes what a crash between those
two steps left behind. A reader finds a blob only through its row, so it never sees half of one.

Locally, a blob is one directory: written under `.staging/`, fsynced, then renamed into place,
so a crash at any moment leaves either the whole blob directory or only staging debris.

Imports neither torch nor the registry: the store knows files, not adapters.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol

from cotune.adapters.durable import fsync

# PEFT's file names (as in peft_format); a version is exactly these two files.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FILES = (CONFIG_NAME, WEIGHTS_NAME)

_BLOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex


class StoreUnavailable(Exception):
    """The store cannot be reached now (an S3 endpoint down or throttling): the call stored
    nothing that any row references, and may be retried."""


class BlobStore(Protocol):
    def publish(self, files: Path) -> str:
        """Copies adapter_config.json and adapter_model.safetensors from directory `files`
        into a new blob and returns its id, once the whole blob is stored. Nothing else in
        `files` is copied. Raises FileNotFoundError when one of the two is missing."""

    def directory(self, blob_id: str) -> Path:
        """A local directory holding the blob's files (a remote store fetches them into its
        cache first)."""

    def open(self, blob_id: str, name: str) -> BinaryIO:
        """One of the blob's files, to read as a stream (`name` one of FILES)."""

    def remove(self, blob_id: str) -> None:
        """Removes a blob; one already gone is no error (a sweep may have removed it)."""

    def sweep(self, keep: set[str]) -> list[str]:
        """Removes what no row references (`keep`: the ids the rows do), when no publish of
        this store's users can be in flight; returns the removed ids."""


def checked_files(files: Path) -> Path:
    """`files`, once it holds both of a version's files."""
    missing = [name for name in FILES if not (Path(files) / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{files} has no {' or '.join(missing)}; accepted: a directory with "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    return Path(files)


class LocalBlobStore:
    """Blobs as directories under `root`, for one node (or several processes on one host)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)

    def publish(self, files: Path) -> str:
        files = checked_files(files)
        tmp = Path(tempfile.mkdtemp(dir=self.staging))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a version is for any reader
            for name in FILES:
                shutil.copyfile(files / name, tmp / name)
                fsync(tmp / name)
            fsync(tmp)
            blob_id = new_blob_id()
            final = self.root / blob_id
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync(self.root)  # the rename itself is durable before the registry references it
        return blob_id

    def directory(self, blob_id: str) -> Path:
        return self.root / checked_blob_id(blob_id)

    def open(self, blob_id: str, name: str) -> BinaryIO:
        return open(self.directory(blob_id) / checked_file_name(name), "rb")

    def remove(self, blob_id: str) -> None:
        shutil.rmtree(self.directory(blob_id), ignore_errors=True)

    def sweep(self, keep: set[str]) -> list[str]:
        """Also removes staging debris."""
        for debris in self.staging.iterdir():
            shutil.rmtree(debris, ignore_errors=True)
        removed = sorted(entry.name for entry in self.root.iterdir()
                         if is_blob_id(entry.name) and entry.name not in keep)
        for blob_id in removed:
            self.remove(blob_id)
        return removed


def new_blob_id() -> str:
    return uuid.uuid4().hex


def is_blob_id(text: str) -> bool:
    return isinstance(text, str) and _BLOB_ID.fullmatch(text) is not None


def checked_blob_id(blob_id: str) -> str:
    # checked before any path or key is built from it: an id is never '..' or a path
    if not is_blob_id(blob_id):
        raise ValueError(f"invalid blob id {blob_id!r}; accepted: 32 lowercase hex digits")
    return blob_id


def checked_file_name(name: str) -> str:
    if name not in FILES:
        raise ValueError(f"{name!r} is not a file of a version; accepted: {', '.join(FILES)}")
    return name
