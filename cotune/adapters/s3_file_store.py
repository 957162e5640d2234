"""Uploaded files in an S3 bucket, shared by every worker of a cluster: a file is the object
`prefix/files/<id>`, stored before its row and removed after it (as file_store.py), read as a
stream (a download, or a job taking in its training data). What a crash between the upload and
the row leaves, the sweep removes once it is older than `orphan_age_s`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import BinaryIO

from cotune.adapters.file_store import checked_file_id, is_file_id
from cotune.adapters.s3_bucket import S3Bucket


class S3FileStore:
    def __init__(self, bucket: S3Bucket, orphan_age_s: float = 3600.0):
        self.bucket, self.orphan_age_s = bucket, orphan_age_s

    def put(self, file_id: str, staged: Path) -> None:
        self.bucket.upload(staged, self._key(file_id))
        Path(staged).unlink()

    def open(self, file_id: str) -> BinaryIO:
        return self.bucket.stream(self._key(file_id))

    def remove(self, file_id: str) -> None:
        self.bucket.delete([self._key(file_id)])

    def sweep(self, keep: set[str]) -> list[str]:
        prefix, old = self.bucket.key("files/"), time.time() - self.orphan_age_s
        orphans = sorted(key[len(prefix):] for key, modified in self.bucket.listed(prefix)
                         if is_file_id(key[len(prefix):]) and key[len(prefix):] not in keep
                         and modified < old)
        for file_id in orphans:
            self.remove(file_id)
        return orphans

    def _key(self, file_id: str) -> str:
        return self.bucket.key(f"files/{checked_file_id(file_id)}")
