"""The database under every record family of the SQLite registry: the schema and its
migrations, the one connection and its transactions, the open that sweeps unreferenced blobs,
and the checks of the arguments that several families take (names, quotas, page limits).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cotune.adapters.blob_store import BlobStore
from cotune.adapters.file_store import FileStore
from cotune.adapters.registry import NAME, InvalidName, Quotas, RegistryError

SCHEMA_VERSION = 4  # 2: jobs.owner, 3: tenants.deleted, 4: jobs.training_file, job_events, files
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    admin INTEGER NOT NULL,
    quotas TEXT NOT NULL,  -- JSON of Quotas
    created REAL NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0  -- 1 once deleted, since schema 3: see below
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    hash TEXT NOT NULL,  -- sha256 hex of the secret, which itself is never stored
    description TEXT NOT NULL,
    created REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tokens_by_tenant ON tokens(tenant);
CREATE TABLE IF NOT EXISTS adapters (  -- a row exists while the adapter has a version
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    labels TEXT NOT NULL,  -- JSON object of strings
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (tenant, name)
);
-- The next version of every adapter name a tenant ever published. Kept apart from adapters,
-- whose row goes with the last version, so that a version number is never reused.
CREATE TABLE IF NOT EXISTS version_counters (
    tenant TEXT NOT NULL REFERENCES tenants(name),
    name TEXT NOT NULL,
    next_version INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS versions (
    adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,  -- JSON list of strings
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,  -- of adapter_model.safetensors
    provenance TEXT NOT NULL,  -- JSON object
    created REAL NOT NULL,
    blob_id TEXT NOT NULL UNIQUE,
    PRIMARY KEY (adapter_id, version)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    adapter TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,  -- JSON object
    error TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    versions TEXT NOT NULL,  -- JSON list of the versions the job published
    progress TEXT NOT NULL,  -- JSON object, the latest report
    owner TEXT NOT NULL DEFAULT '',  -- the worker that runs it (its id), since schema 2
    training_file TEXT NOT NULL DEFAULT ''  -- the file id it trains on, since schema 4
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs(tenant, created, id);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, created, id);
-- What ListJobEvents shows after the fact. A job's events go with it (its tenant's deletion).
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    sequence INTEGER NOT NULL,  -- from 1 per job
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,  -- JSON object
    PRIMARY KEY (job_id, sequence)
);
-- A file's bytes are data_dir/files/<id>, written before its row and removed after it.
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_tenant ON files(tenant, created, id);
"""

# A deleted tenant's row stays (tenants.deleted = 1) for its version_counters: a tenant created
# again under the name never reuses a version number, which the runtime's caches key weights by.
_MIGRATIONS = {  # from version
    1: "ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
    2: "ALTER TABLE tenants ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0",
    3: "ALTER TABLE jobs ADD COLUMN training_file TEXT NOT NULL DEFAULT ''",  # new tables: _SCHEMA
}

_UNLIMITED = Quotas()
_NAMES_ACCEPTED = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


class SqliteDatabase:
    """data_dir's database and blob store, which the record families' classes (tenants,
    versions, jobs) build on: each call of theirs is one `_transaction`."""

    def __init__(self, data_dir: Path, default_quotas: Quotas = _UNLIMITED):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.default_quotas = checked_quotas(default_quotas)
        self._blobs = BlobStore(self.data_dir / "blobs")
        self._files = FileStore(self.data_dir / "files")
        self._lock = threading.Lock()
        self._dir_lock = os.open(self.data_dir / "registry.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            alone = _try_flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._db = sqlite3.connect(self.data_dir / "registry.sqlite3", timeout=30,
                                       check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
                self._db.execute(f"PRAGMA {pragma}")
            self._create_schema()
            if alone:
                with self._transaction() as db:
                    referenced = {row[0] for row in db.execute("SELECT blob_id FROM versions")}
                    files = {row[0] for row in db.execute("SELECT id FROM files")}
                self._blobs.sweep(referenced)
                self._files.sweep(files)
            fcntl.flock(self._dir_lock, fcntl.LOCK_SH)  # held until close: others skip sweeps
        except BaseException:
            os.close(self._dir_lock)
            raise

    def _create_schema(self) -> None:
        """Creates or migrates the tables; the version is read under the write lock, so that
        of processes opening one registry together exactly one migrates it."""
        with self._transaction(write=True) as db:
            found = db.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.data_dir / 'registry.sqlite3'} has schema version {found}, newer "
                    f"than this cotune's {SCHEMA_VERSION}; accepted: a registry written by this "
                    "or an older cotune (upgrade cotune to open this one)")
            tables = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
            for version in range(found if tables else SCHEMA_VERSION, SCHEMA_VERSION):
                db.execute(_MIGRATIONS[version])
            for statement in _SCHEMA.split(";"):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One call's transaction; a writer takes SQLite's write lock at BEGIN, so what it
        reads (a quota count, the next version) cannot change before it commits."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
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
