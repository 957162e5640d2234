"""Uploaded files on local disk: one file per id, `root/<id>`, the id made by the registry.

A file arrives already written and checked in a staging directory on the same filesystem; it
is fsynced, then renamed into place, so a crash leaves the whole file or none. As with version
blobs (blob_store.py), the registry stores a file before inserting its row and removes it
after committing the row's deletion; `sweep` at start-up removes what a crash between those
steps left.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from cotune.adapters.durable import fsync

_FILE_ID = re.compile(r"file-[0-9a-f]{24}")


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def is_file_id(text: str) -> bool:
    return isinstance(text, str) and _FILE_ID.fullmatch(text) is not None


class FileStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, file_id: str, staged: Path) -> Path:
        """Moves `staged` to the file of `file_id`; returns its path."""
        final = self.path(file_id)
        fsync(staged)
        os.rename(staged, final)
        fsync(self.root)  # the rename itself is durable before the registry references it
        return final

    def path(self, file_id: str) -> Path:
        # checked before any path is built from it: an id is never '..' or a path
        if not is_file_id(file_id):
            raise ValueError(f"invalid file id {file_id!r}; accepted: 'file-' and 24 "
                             "lowercase hex digits")
        return self.root / file_id

    def remove(self, file_id: str) -> None:
        """Removes a file; one already gone is no error (a sweep may have removed it)."""
        self.path(file_id).unlink(missing_ok=True)

    def sweep(self, keep: set[str]) -> list[str]:
        """Removes every file not in `keep`; returns their ids. Called at start-up, when no
        upload is in flight, with the ids the database references."""
        removed = sorted(entry.name for entry in self.root.iterdir()
                         if is_file_id(entry.name) and entry.name not in keep)
        for file_id in removed:
            self.remove(file_id)
        return removed
