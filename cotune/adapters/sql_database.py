"""The database under every record family of the registry, on either backend (sqlite_database,
postgres_database): the blob and file stores beside it and the sweep of what no row
references, the transactions the families run their calls in, and the checks of the arguments
that several families take (names, quotas, page limits).

The families write one SQL for both backends: `?` placeholders, standard SQL that SQLite and
PostgreSQL share (`INSERT ... ON CONFLICT`, `RETURNING`, row comparisons), and for the one
thing they do not share, a condition on an adapter's JSON labels, the backend's `label_match`.
Every write runs under one lock that spans the processes (SQLite's write lock, a PostgreSQL
advisory lock), so a check that must hold across workers (a quota, the next version number, the
first admin, the claim of unowned jobs) is read and acted on in one transaction that no other
writer interleaves.

Version blobs and uploaded files live in their stores (data_dir/blobs and data_dir/files, or an
S3 bucket: stores.py): a blob or file is stored before the row that references it is inserted and
removed after the row's deletion is committed, so a crash leaves at worst one that no row
references, which the next open sweeps away. Only a process that opens data_dir while no other
process has it open sweeps (an exclusive flock), so a command run beside a server never removes
a blob the server is about to insert (and an S3 store removes only what is old).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from cotune.adapters.registry import NAME, NO_LIMITS, InvalidName, Quotas
from cotune.adapters.stores import Stores, local_stores

_NAMES_ACCEPTED = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


class Row(Protocol):
    """A row by position or by column name (sqlite3.Row, postgres_database.Row)."""

    def __getitem__(self, key: int | str) -> Any: ...


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> list[Row]: ...

    def __iter__(self) -> Iterator[Row]: ...


class Connection(Protocol):
    """What a transaction yields: SQL with `?` placeholders."""

    def execute(self, sql: str, params: Sequence = ()) -> Cursor: ...


class SqlDatabase(ABC):
    """The stores and the transactions that the record families' classes (tenants, versions,
    jobs, files) build on: each call of theirs is one `_transaction`. A backend opens its
    database, migrates it (schema_migrations), then calls `_open_stores`."""

    label_match: str  # true when adapter `a` has label ? (key) with value ? (value)

    def __init__(self, data_dir: Path, default_quotas: Quotas = NO_LIMITS,
                 stores: Stores | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.default_quotas = checked_quotas(default_quotas)
        stores = stores or local_stores(self.data_dir)
        self._blobs, self._files = stores.blobs, stores.files
        self._dir_lock = -1

    def _open_stores(self) -> None:
        """Sweeps the stores when this process is alone on data_dir, then holds a shared lock
        on it until close, so that others skip their sweeps."""
        self._dir_lock = os.open(self.data_dir / "registry.lock", os.O_RDWR | os.O_CREAT, 0o644)
        if _try_flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB):
            with self._transaction() as db:
                referenced = {row[0] for row in db.execute("SELECT blob_id FROM versions")}
                files = {row[0] for row in db.execute("SELECT id FROM files")}
            self._blobs.sweep(referenced)
            self._files.sweep(files)
        fcntl.flock(self._dir_lock, fcntl.LOCK_SH)

    @abstractmethod
    def _transaction(self, write: bool = False) -> AbstractContextManager[Connection]:
        """One call's transaction, committed when the block ends and rolled back when it
        raises. A writer holds the write lock from its first statement, so what it reads (a
        quota count, the next version) cannot change before it commits."""

    def close(self) -> None:
        if self._dir_lock >= 0:
            os.close(self._dir_lock)
            self._dir_lock = -1


def check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidName(f"invalid {kind} name {name!r}; accepted: {_NAMES_ACCEPTED}")


def checked_quotas(quotas: Quotas) -> Quotas:
    for field in dataclasses.fields(Quotas):
        value = getattr(quotas, field.name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"quota {field.name}={value!r} is invalid; accepted: a whole "
                             "number >= 0 (0: no limit)")
    return quotas


def checked_limit(limit: int) -> int:
    if limit < 1:
        raise ValueError(f"limit {limit} is invalid; accepted: a page of at least 1")
    return limit


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        return False
    return True
