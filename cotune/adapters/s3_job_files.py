"""A job's directory, as much of it as a worker taking the job over needs, in an S3 bucket:
job_dir/<path> is the object `prefix/jobs/<job id>/<path>`."""

from __future__ import annotations

from pathlib import Path

from cotune.adapters.s3_bucket import S3Bucket

_JOB_ID_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


class S3JobFiles:
    def __init__(self, bucket: S3Bucket):
        self.bucket = bucket

    def keep(self, job_id: str, job_dir: Path, names: list[str]) -> None:
        for name in names:
            source = job_dir / name
            files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() \
                else [source] if source.is_file() else []
            for path in files:
                self.bucket.upload(path, self._prefix(job_id) + path.relative_to(job_dir)
                                   .as_posix())

    def fetch(self, job_id: str, job_dir: Path) -> bool:
        prefix = self._prefix(job_id)
        found = False
        for key, _ in self.bucket.listed(prefix):
            relative = Path(key[len(prefix):])
            if relative.is_absolute() or ".." in relative.parts:
                continue  # never a path out of job_dir, whatever the bucket holds
            target = job_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self.bucket.download(key, target)
            found = True
        return found

    def forget(self, job_id: str, names: list[str] | None = None) -> None:
        prefixes = [self._prefix(job_id) + name.rstrip("/") for name in names] \
            if names is not None else [self._prefix(job_id)]
        keys = [key for prefix in prefixes for key, _ in self.bucket.listed(prefix)]
        for start in range(0, len(keys), 1000):  # S3 deletes at most 1000 at once
            self.bucket.delete(keys[start:start + 1000])

    def _prefix(self, job_id: str) -> str:
        if not job_id or not set(job_id) <= _JOB_ID_CHARS:  # checked before a key is built
            raise ValueError(f"invalid job id {job_id!r}; accepted: 'job-' and hex digits")
        return self.bucket.key(f"jobs/{job_id}/")
