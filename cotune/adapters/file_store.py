"""Uploaded files, one per id made by the registry: the interface, its local directory
(LocalFileStore) and, for workers on several nodes, an S3 bucket (s3_file_store).

As with version blobs (blob_store.py), the registry stores a file before inserting its row and
removes it after committing the row's deletion; `sweep` at start-up removes what a crash
between those steps left.

Locally a file is `root/<id>`: it arrives already written and checked in a staging directory
on the same filesystem, is fsynced, then renamed into place, so a crash leaves the whole file
or none.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Protocol

from cotune.adapters.durable import fsync

_FILE_ID = re.compile(r"file-[0-9a-f]{24}")


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def is_file_id(text: str) -> bool:
    return isinstance(text, str) and _FILE_ID.fullmatch(text) is not None


def checked_file_id(file_id: str) -> str:
    # checked before any path or key is built from it: an id is never '..' or a path
    if not is_file_id(file_id):
        raise ValueError(f"invalid file id {file_id!r}; accepted: 'file-' and 24 "
                         "lowercase hex digits")
    return file_id


class FileStore(Protocol):
    def put(self, file_id: str, staged: Path) -> None:
        """Stores the file `staged` (on data_dir's filesystem) as `file_id`, whole once this
        returns; `staged` is gone then."""

    def open(self, file_id: str) -> BinaryIO:
        """The file, to read as a stream; FileNotFoundError when it is gone."""

    def remove(self, file_id: str) -> None:
        """Removes a file; one already gone is no error (a sweep may have removed it)."""

    def sweep(self, keep: set[str]) -> list[str]:
        """Removes what no row references (`keep`: the ids the rows do), when no upload of
        this store's users can be in flight; returns the removed ids."""


class LocalFileStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, file_id: str, staged: Path) -> None:
        final = self.root / checked_file_id(file_id)
        fsync(staged)
        os.rename(staged, final)
        fsync(self.root)  # the rename itself is durable before the registry references it

    def open(self, file_id: str) -> BinaryIO:
        return open(self.root / checked_file_id(file_id), "rb")

    def remove(self, file_id: str) -> None:
        (self.root / checked_file_id(file_id)).unlink(missing_ok=True)

    def sweep(self, keep: set[str]) -> list[str]:
        removed = sorted(entry.name for entry in self.root.iterdir()
                         if is_file_id(entry.name) and entry.name not in keep)
        for file_id in removed:
            self.remove(file_id)
        return removed
