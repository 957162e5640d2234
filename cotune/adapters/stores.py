"""Where the registry keeps the bytes its rows reference, version blobs and uploaded files, and
where the jobs keep what another worker needs to take one over: in local directories of
data_dir (one node), or all in one S3 bucket (a cluster: any worker reads what another
stored), chosen by one URL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cotune.adapters.blob_store import BlobStore, LocalBlobStore
from cotune.adapters.file_store import FileStore, LocalFileStore
from cotune.adapters.job_files import JobFiles, LocalJobFiles


@dataclass(frozen=True)
class Stores:
    blobs: BlobStore
    files: FileStore
    jobs: JobFiles


def local_stores(data_dir: Path) -> Stores:
    return Stores(LocalBlobStore(Path(data_dir) / "blobs"),
                  LocalFileStore(Path(data_dir) / "files"), LocalJobFiles())


def open_stores(url: str, data_dir: Path, cache_bytes: int) -> Stores:
    """The stores at `url`: "" is data_dir's directories; "s3://bucket/prefix" the bucket's
    prefix, with a disk cache of `cache_bytes` of versions in data_dir/blob-cache. A prefix
    belongs to one registry: the registry's sweep removes what its rows do not reference."""
    if not url:
        return local_stores(data_dir)
    from cotune.adapters.s3_blob_store import S3BlobStore  # boto3: for clusters only
    from cotune.adapters.s3_bucket import S3Bucket
    from cotune.adapters.s3_file_store import S3FileStore
    from cotune.adapters.s3_job_files import S3JobFiles

    bucket = S3Bucket(url)
    return Stores(S3BlobStore(bucket, Path(data_dir) / "blob-cache", cache_bytes),
                  S3FileStore(bucket), S3JobFiles(bucket))
