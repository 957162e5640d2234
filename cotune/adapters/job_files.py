"""What a worker that takes a job over needs of the job's directory (its data, the version it
continues, its checkpoints), kept where every worker of the cluster reaches it: the interface,
and its local form, which keeps nothing (workers on one data directory share the job
directories themselves). The cluster's form is s3_job_files."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class JobFiles(Protocol):
    def keep(self, job_id: str, job_dir: Path, names: list[str]) -> None:
        """Stores job_dir/name (a file, or a directory with everything in it) for each name
        that exists, under the job's id; one stored before is replaced."""

    def fetch(self, job_id: str, job_dir: Path) -> bool:
        """Writes what is stored of the job into job_dir; False when nothing is."""

    def forget(self, job_id: str, names: list[str] | None = None) -> None:
        """Removes what is stored of the job under `names` (None: all of it)."""


class LocalJobFiles:
    """Job directories stay on data_dir, which the workers that may take a job over share."""

    def keep(self, job_id: str, job_dir: Path, names: list[str]) -> None:
        pass

    def fetch(self, job_id: str, job_dir: Path) -> bool:
        return False

    def forget(self, job_id: str, names: list[str] | None = None) -> None:
        pass
