"""One prefix of an S3-compatible bucket (AWS S3, MinIO, Ceph, ...), the part of a remote store
that speaks S3: object keys, uploads, downloads, streams, deletes and listings, with S3's
failures in the store's words (s3_blob_store and s3_file_store build on it).

`url` is `s3://bucket/prefix`. The endpoint, region and credentials are boto3's, from the
environment (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or
a role). A failure the store may recover from (no connection, a 5xx, throttling) is
StoreUnavailable; a missing object or bucket, FileNotFoundError.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions

from cotune.adapters.blob_store import StoreUnavailable

_CONFIG = botocore.config.Config(retries={"mode": "standard", "max_attempts": 3},
                                 connect_timeout=5, read_timeout=60)


class S3Bucket:
    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"blob store URL {url!r} is invalid; accepted: s3://bucket or "
                             "s3://bucket/prefix")
        self.where, self.bucket = url, parts.netloc
        self.prefix = parts.path.strip("/") + "/" if parts.path.strip("/") else ""
        self._s3 = boto3.session.Session().client("s3", config=_CONFIG)
        with self.reaching():  # a wrong bucket or endpoint fails the start, not a publish
            self._s3.head_bucket(Bucket=self.bucket)

    def key(self, name: str) -> str:
        return self.prefix + name

    def upload(self, path: Path, key: str) -> None:
        with self.reaching():
            self._s3.upload_file(str(path), self.bucket, key)  # in parts when large

    def download(self, key: str, path: Path) -> None:
        with self.reaching():
            self._s3.download_file(self.bucket, key, str(path))

    def stream(self, key: str) -> BinaryIO:
        with self.reaching():
            return self._s3.get_object(Bucket=self.bucket, Key=key)["Body"]

    def delete(self, keys: list[str]) -> None:
        with self.reaching():
            self._s3.delete_objects(Bucket=self.bucket,
                                    Delete={"Objects": [{"Key": key} for key in keys]})

    def listed(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, last modified, seconds since the epoch) of the objects under `prefix`."""
        with self.reaching():
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", ()):
                    yield item["Key"], item["LastModified"].timestamp()

    @contextmanager
    def reaching(self) -> Iterator[None]:
        try:
            yield
        except botocore.exceptions.ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = error.response.get("Error", {}).get("Code", "")
            if status == 404 or code in ("404", "NoSuchKey", "NoSuchBucket"):
                raise FileNotFoundError(f"{code or 'not found'} in the blob store {self.where}: "
                                        f"{error}") from None
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling"):
                raise self._unavailable(code) from error
            raise
        # no connection or no credentials; an upload's failure comes wrapped
        except (botocore.exceptions.BotoCoreError, boto3.exceptions.S3UploadFailedError) as error:
            raise self._unavailable(str(error)) from error

    def _unavailable(self, reason: str) -> StoreUnavailable:
        return StoreUnavailable(f"the blob store {self.where} is unavailable ({reason}); the "
                                "call may be retried")
