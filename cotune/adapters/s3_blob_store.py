"""Version blobs in an S3 bucket, shared by every worker of a cluster, with each worker's
BlobCache on its own disk in front: a blob's files are the objects `prefix/blobs/<id>/<file>`.

A publish uploads both files, then returns: the registry inserts the row that makes the version
visible only after, so no reader ever finds half a version, and a publish that fails removes
what it uploaded. What a crash between the upload and the row leaves, the sweep removes once it
is older than `orphan_age_s` (another worker's publish may be between its upload and its row).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import BinaryIO

from cotune.adapters.blob_cache import BlobCache
from cotune.adapters.blob_store import (
    FILES,
    StoreUnavailable,
    checked_blob_id,
    checked_file_name,
    checked_files,
    is_blob_id,
    new_blob_id,
)
from cotune.adapters.s3_bucket import S3Bucket


class S3BlobStore:
    def __init__(self, bucket: S3Bucket, cache_root: Path, cache_bytes: int,
                 orphan_age_s: float = 3600.0):
        self.bucket, self.orphan_age_s = bucket, orphan_age_s
        self._cache = BlobCache(cache_root, cache_bytes)

    def publish(self, files: Path) -> str:
        files = checked_files(files)
        blob_id = new_blob_id()
        try:
            for name in FILES:
                self.bucket.upload(files / name, self._key(blob_id, name))
        except BaseException:
            try:
                self.remove(blob_id)
            except StoreUnavailable:
                pass  # what stays, the sweep removes
            raise
        self._cache.put(blob_id, lambda into: _copy(files, into))  # served here next, likely
        return blob_id

    def directory(self, blob_id: str) -> Path:
        return self._cache.get(blob_id) or self._cache.put(blob_id, lambda into: self._fetch(
            blob_id, into))

    def open(self, blob_id: str, name: str) -> BinaryIO:
        return self.bucket.stream(self._key(blob_id, checked_file_name(name)))

    def remove(self, blob_id: str) -> None:
        self._cache.discard(blob_id)
        self.bucket.delete([self._key(blob_id, name) for name in FILES])

    def sweep(self, keep: set[str]) -> list[str]:
        self._cache.sweep(keep)
        prefix, old = self.bucket.key("blobs/"), time.time() - self.orphan_age_s
        orphans = set()
        for key, modified in self.bucket.listed(prefix):
            blob_id = key[len(prefix):].split("/", 1)[0]
            if is_blob_id(blob_id) and blob_id not in keep and modified < old:
                orphans.add(blob_id)
        for blob_id in sorted(orphans):
            self.remove(blob_id)
        return sorted(orphans)

    def _key(self, blob_id: str, name: str) -> str:
        return self.bucket.key(f"blobs/{checked_blob_id(blob_id)}/{name}")

    def _fetch(self, blob_id: str, into: Path) -> None:
        for name in FILES:
            self.bucket.download(self._key(blob_id, name), into / name)


def _copy(files: Path, into: Path) -> None:
    for name in FILES:
        shutil.copyfile(files / name, into / name)
