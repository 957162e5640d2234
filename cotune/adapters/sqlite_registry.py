"""The embedded registry: SQLite in data_dir/registry.sqlite3, version files in data_dir/blobs.

The database runs in WAL mode with synchronous=FULL, so a committed call survives a crash. One
connection serves every thread of the server, guarded by a lock, and every call is one
transaction. A version's blob is published before the row that references it is inserted, and
removed after the row's deletion is committed: a crash leaves at worst a blob that no row
references, which the next open sweeps away. Only a process that opens data_dir while no other
process has it open sweeps (an exclusive flock), so an admin command run beside a server never
removes a blob the server is about to insert.

Several workers may share one data_dir (the processes behind one router, on one host): every
check that must hold across them (quotas, the next version number, the first admin, the claim
of unowned jobs) runs in one write transaction, and SQLite's write lock spans processes; a
token is checked against the database at every call, so a revocation holds everywhere at once.
SQLite's WAL needs memory shared by the processes, so they must share a host (a local
directory or a volume mounted on one node), not a network filesystem.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cotune.adapters.blob_store import CONFIG_NAME, FILES, WEIGHTS_NAME, BlobStore
from cotune.adapters.registry import (
    JOB_STATES,
    NAME,
    UNFINISHED_JOB_STATES,
    AdapterRecord,
    AlreadyExists,
    InvalidName,
    JobRecord,
    NotFound,
    QuotaExceeded,
    Quotas,
    RegistryError,
    TenantRecord,
    TokenRecord,
    VersionRecord,
)

SCHEMA_VERSION = 2  # 2: jobs.owner
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    admin INTEGER NOT NULL,
    quotas TEXT NOT NULL,  -- JSON of Quotas
    created REAL NOT NULL
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
    owner TEXT NOT NULL DEFAULT ''  -- the worker that runs it (its id), since schema 2
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs(tenant, created, id);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, created, id);
"""

_MIGRATIONS = {1: "ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''"}  # from version

_ADAPTERS = """
SELECT a.tenant, a.name, a.description, a.labels, a.created, a.updated,
       MAX(v.version) AS latest_version, COUNT(*) AS version_count
FROM adapters a JOIN versions v ON v.adapter_id = a.id
WHERE {where} GROUP BY a.id ORDER BY a.name LIMIT ?"""
_VERSIONS = """
SELECT a.tenant, a.name, v.* FROM versions v JOIN adapters a ON a.id = v.adapter_id
WHERE {where} ORDER BY v.version {order} LIMIT ?"""
_UNLIMITED = Quotas()
_NAMES_ACCEPTED = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
_TOKEN = re.compile(r"ct_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")  # ct_<id>_<token_urlsafe(32)>


class SqliteRegistry:
    """The Registry on one SQLite file; safe to call from any thread."""

    def __init__(self, data_dir: Path, default_quotas: Quotas = _UNLIMITED):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.default_quotas = _checked_quotas(default_quotas)
        self._blobs = BlobStore(self.data_dir / "blobs")
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
                self._blobs.sweep(referenced)
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

    # --- tenants and tokens -------------------------------------------------------------

    def create_tenant(self, name: str, admin: bool = False,
                      quotas: Quotas | None = None) -> TenantRecord:
        _check_name("tenant", name)
        record = TenantRecord(name=name, admin=bool(admin), created=time.time(),
                              quotas=_checked_quotas(
                                  self.default_quotas if quotas is None else quotas))
        with self._transaction(write=True) as db:
            _insert_tenant(db, record)
        return record

    def get_tenant(self, name: str) -> TenantRecord:
        with self._transaction() as db:
            return _tenant(db, name)

    def list_tenants(self, after: str | None = None, limit: int = 50) -> list[TenantRecord]:
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM tenants WHERE name > ? ORDER BY name LIMIT ?",
                              (after or "", _checked_limit(limit))).fetchall()
        return [_tenant_record(row) for row in rows]

    def set_quotas(self, name: str, quotas: Quotas) -> TenantRecord:
        quotas = _checked_quotas(quotas)
        with self._transaction(write=True) as db:
            _tenant(db, name)
            db.execute("UPDATE tenants SET quotas = ? WHERE name = ?",
                       (_quotas_json(quotas), name))
            return _tenant(db, name)

    def issue_token(self, tenant: str, description: str = "",
                    token: str | None = None) -> tuple[TokenRecord, str]:
        token_id, secret = _token_parts(token)
        record = TokenRecord(id=token_id, tenant=tenant, description=description,
                             created=time.time(), revoked=False)
        with self._transaction(write=True) as db:
            _tenant(db, tenant)
            _insert_token(db, record, secret)
        return record, f"ct_{token_id}_{secret}"

    def bootstrap_admin(self, token: str | None = None) -> str | None:
        token_id, secret = _token_parts(token)
        now = time.time()
        with self._transaction(write=True) as db:
            if db.execute("SELECT 1 FROM tenants LIMIT 1").fetchone() is not None:
                return None
            _insert_tenant(db, TenantRecord(name="admin", admin=True, quotas=Quotas(),
                                            created=now))
            _insert_token(db, TokenRecord(id=token_id, tenant="admin", created=now,
                                          description="created at the first start",
                                          revoked=False), secret)
        return f"ct_{token_id}_{secret}"

    def revoke_token(self, token_id: str) -> bool:
        with self._transaction(write=True) as db:
            cursor = db.execute("UPDATE tokens SET revoked = 1 WHERE id = ? AND revoked = 0",
                                (token_id,))
            return cursor.rowcount == 1

    def tokens(self, tenant: str) -> list[TokenRecord]:
        with self._transaction() as db:
            _tenant(db, tenant)
            rows = db.execute("SELECT * FROM tokens WHERE tenant = ? ORDER BY rowid",
                              (tenant,)).fetchall()
        return [TokenRecord(id=row["id"], tenant=row["tenant"], description=row["description"],
                            created=row["created"], revoked=bool(row["revoked"])) for row in rows]

    def authenticate(self, token: str) -> TenantRecord | None:
        match = _TOKEN.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            return None
        token_id, secret = match.groups()
        with self._transaction() as db:
            row = db.execute("SELECT t.hash, t.revoked, n.* FROM tokens t "
                             "JOIN tenants n ON n.name = t.tenant WHERE t.id = ?",
                             (token_id,)).fetchone()
        if row is None or row["revoked"]:
            return None
        if not hmac.compare_digest(row["hash"], _secret_hash(secret)):
            return None
        return _tenant_record(row)

    # --- adapters and versions ----------------------------------------------------------

    def publish_version(self, tenant: str, name: str, files: Path, provenance: dict,
                        description: str | None = None,
                        labels: dict[str, str] | None = None) -> VersionRecord:
        _check_name("adapter", name)
        provenance_json = json.dumps(provenance)
        blob_id, path = self._blobs.publish(files)
        try:
            rank, alpha, target_modules = _lora_shape(path / CONFIG_NAME)
            size_bytes = sum((path / file).stat().st_size for file in FILES)
            sha256 = _file_sha256(path / WEIGHTS_NAME)
            now = time.time()
            with self._transaction(write=True) as db:
                quotas = _tenant(db, tenant).quotas
                adapter_id = self._adapter_for_new_version(db, tenant, name, quotas, now,
                                                           description, labels)
                version = _next_version(db, tenant, name)
                db.execute("INSERT INTO versions (adapter_id, version, rank, alpha, "
                           "target_modules, size_bytes, sha256, provenance, created, blob_id) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (adapter_id, version, rank, alpha, json.dumps(target_modules),
                            size_bytes, sha256, provenance_json, now, blob_id))
        except BaseException:
            self._blobs.remove(blob_id)
            raise
        return VersionRecord(tenant=tenant, name=name, version=version, rank=rank, alpha=alpha,
                             target_modules=target_modules, size_bytes=size_bytes, sha256=sha256,
                             provenance=json.loads(provenance_json), created=now, path=path)

    def _adapter_for_new_version(self, db: sqlite3.Connection, tenant: str, name: str,
                                 quotas: Quotas, now: float, description: str | None,
                                 labels: dict[str, str] | None) -> int:
        """The id of the adapter a new version joins, created when new; checks the quotas."""
        row = db.execute("SELECT id FROM adapters WHERE tenant = ? AND name = ?",
                         (tenant, name)).fetchone()
        if row is None:
            count = db.execute("SELECT COUNT(*) FROM adapters WHERE tenant = ?",
                               (tenant,)).fetchone()[0]
            if 0 < quotas.max_adapters <= count:
                raise QuotaExceeded("max_adapters", (
                    f"tenant {tenant!r} has {count} adapters, its max_adapters quota is "
                    f"{quotas.max_adapters}; publish a new version of an existing adapter, "
                    "delete an adapter, or ask an administrator to raise max_adapters"))
            return db.execute(
                "INSERT INTO adapters (tenant, name, description, labels, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (tenant, name, description or "", json.dumps(labels or {}), now, now)).lastrowid
        count = db.execute("SELECT COUNT(*) FROM versions WHERE adapter_id = ?",
                           (row["id"],)).fetchone()[0]
        if 0 < quotas.max_versions_per_adapter <= count:
            raise QuotaExceeded("max_versions_per_adapter", (
                f"adapter {name!r} has {count} versions, tenant {tenant!r}'s "
                f"max_versions_per_adapter quota is {quotas.max_versions_per_adapter}; delete "
                "an old version or ask an administrator to raise max_versions_per_adapter"))
        db.execute("UPDATE adapters SET updated = ?, description = COALESCE(?, description), "
                   "labels = COALESCE(?, labels) WHERE id = ?",
                   (now, description, None if labels is None else json.dumps(labels), row["id"]))
        return row["id"]

    def get_adapter(self, tenant: str, name: str) -> AdapterRecord:
        with self._transaction() as db:
            row = db.execute(_ADAPTERS.format(where="a.tenant = ? AND a.name = ?"),
                             (tenant, name, 1)).fetchone()
        if row is None:
            raise NotFound(f"adapter {name!r} not found")
        return _adapter_record(row)

    def list_adapters(self, tenant: str, name_prefix: str = "",
                      labels: dict[str, str] | None = None, after: str | None = None,
                      limit: int = 50) -> list[AdapterRecord]:
        where = ["a.tenant = ?", "a.name > ?", "substr(a.name, 1, ?) = ?"]
        params: list = [tenant, after or "", len(name_prefix), name_prefix]
        for key, value in (labels or {}).items():
            where.append("EXISTS (SELECT 1 FROM json_each(a.labels) WHERE key = ? AND value = ?)")
            params += [key, value]
        with self._transaction() as db:
            rows = db.execute(_ADAPTERS.format(where=" AND ".join(where)),
                              (*params, _checked_limit(limit))).fetchall()
        return [_adapter_record(row) for row in rows]

    def get_version(self, tenant: str, name: str, version: int | None = None) -> VersionRecord:
        where, params = "a.tenant = ? AND a.name = ?", [tenant, name]
        if version is not None:
            where, params = where + " AND v.version = ?", params + [version]
        with self._transaction() as db:
            row = db.execute(_VERSIONS.format(where=where, order="DESC"), (*params, 1)).fetchone()
            if row is None:
                _adapter_id(db, tenant, name)
                raise NotFound(f"version {version} of adapter {name!r} not found")
        return self._version_record(row)

    def list_versions(self, tenant: str, name: str, after: int | None = None,
                      limit: int = 50) -> list[VersionRecord]:
        with self._transaction() as db:
            _adapter_id(db, tenant, name)
            rows = db.execute(
                _VERSIONS.format(where="a.tenant = ? AND a.name = ? AND v.version > ?",
                                 order="ASC"),
                (tenant, name, after or 0, _checked_limit(limit))).fetchall()
        return [self._version_record(row) for row in rows]

    def delete_adapter(self, tenant: str, name: str, version: int | None = None) -> int:
        with self._transaction(write=True) as db:
            adapter_id = _adapter_id(db, tenant, name)
            if version is None:
                blob_ids = [row[0] for row in db.execute(
                    "SELECT blob_id FROM versions WHERE adapter_id = ?", (adapter_id,))]
                db.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,))  # versions cascade
            else:
                row = db.execute("SELECT blob_id FROM versions WHERE adapter_id = ? AND "
                                 "version = ?", (adapter_id, version)).fetchone()
                if row is None:
                    raise NotFound(f"version {version} of adapter {name!r} not found")
                blob_ids = [row[0]]
                db.execute("DELETE FROM versions WHERE adapter_id = ? AND version = ?",
                           (adapter_id, version))
                db.execute("DELETE FROM adapters WHERE id = ? AND NOT EXISTS "  # the last one
                           "(SELECT 1 FROM versions WHERE adapter_id = ?)",
                           (adapter_id, adapter_id))
        for blob_id in blob_ids:  # after the commit: a crash here leaves blobs the sweep removes
            self._blobs.remove(blob_id)
        return len(blob_ids)

    def _version_record(self, row: sqlite3.Row) -> VersionRecord:
        return VersionRecord(
            tenant=row["tenant"], name=row["name"], version=row["version"], rank=row["rank"],
            alpha=row["alpha"], target_modules=tuple(json.loads(row["target_modules"])),
            size_bytes=row["size_bytes"], sha256=row["sha256"],
            provenance=json.loads(row["provenance"]), created=row["created"],
            path=self._blobs.path(row["blob_id"]))

    # --- jobs ---------------------------------------------------------------------------

    def create_job(self, tenant: str, adapter: str, spec: dict, owner: str = "") -> JobRecord:
        _check_name("adapter", adapter)
        now = time.time()
        job = JobRecord(id=f"job-{secrets.token_hex(8)}", tenant=tenant, adapter=adapter,
                        state="queued", spec=json.loads(json.dumps(spec)), error="",
                        created=now, updated=now, owner=owner)
        with self._transaction(write=True) as db:
            limit = _tenant(db, tenant).quotas.max_concurrent_jobs
            count = db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN "
                f"({', '.join('?' * len(UNFINISHED_JOB_STATES))})",
                (tenant, *UNFINISHED_JOB_STATES)).fetchone()[0]
            if 0 < limit <= count:
                raise QuotaExceeded("max_concurrent_jobs", (
                    f"tenant {tenant!r} has {count} jobs queued or running, its "
                    f"max_concurrent_jobs quota is {limit}; wait for one to finish, cancel one, "
                    "or ask an administrator to raise max_concurrent_jobs"))
            db.execute("INSERT INTO jobs (id, tenant, adapter, state, spec, error, created, "
                       "updated, versions, progress, owner) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, '[]', '{}', ?)",
                       (job.id, tenant, adapter, job.state, json.dumps(job.spec), job.error,
                        now, now, owner))
        return job

    def get_job(self, tenant: str, job_id: str) -> JobRecord:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ? AND tenant = ?",
                             (job_id, tenant)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return _job_record(row)

    def list_jobs(self, tenant: str, state: str | None = None, after: str | None = None,
                  limit: int = 50) -> list[JobRecord]:
        where, params = ["tenant = ?"], [tenant]
        if state is not None:
            where.append("state = ?")
            params.append(_checked_state(state))
        with self._transaction() as db:
            if after is not None:
                cursor = db.execute("SELECT created, id FROM jobs WHERE id = ? AND tenant = ?",
                                    (after, tenant)).fetchone()
                if cursor is None:
                    raise NotFound(f"job {after!r} not found; accepted as `after`: the id of "
                                   "the last job of the previous page")
                where.append("(created, id) < (?, ?)")
                params += [cursor["created"], cursor["id"]]
            rows = db.execute(f"SELECT * FROM jobs WHERE {' AND '.join(where)} "
                              "ORDER BY created DESC, id DESC LIMIT ?",
                              (*params, _checked_limit(limit))).fetchall()
        return [_job_record(row) for row in rows]

    def update_job(self, job_id: str, *, state: str | None = None, error: str | None = None,
                   version: int | None = None, progress: dict | None = None) -> JobRecord:
        if state is not None:
            _checked_state(state)
        with self._transaction(write=True) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            job = _job_record(row)
            job = dataclasses.replace(
                job, state=state or job.state, updated=time.time(),
                error=job.error if error is None else error,
                versions=job.versions if version is None else (*job.versions, version),
                progress=job.progress if progress is None else json.loads(json.dumps(progress)))
            db.execute("UPDATE jobs SET state = ?, error = ?, versions = ?, progress = ?, "
                       "updated = ? WHERE id = ?",
                       (job.state, job.error, json.dumps(job.versions), json.dumps(job.progress),
                        job.updated, job_id))
        return job

    def unfinished_jobs(self, owner: str | None = None) -> list[JobRecord]:
        unfinished = f"state IN ({', '.join('?' * len(UNFINISHED_JOB_STATES))})"
        with self._transaction(write=owner is not None) as db:
            if owner is None:
                rows = db.execute(f"SELECT * FROM jobs WHERE {unfinished} ORDER BY created, id",
                                  UNFINISHED_JOB_STATES).fetchall()
            else:
                db.execute(f"UPDATE jobs SET owner = ? WHERE owner = '' AND {unfinished}",
                           (owner, *UNFINISHED_JOB_STATES))
                rows = db.execute(f"SELECT * FROM jobs WHERE owner = ? AND {unfinished} "
                                  "ORDER BY created, id", (owner, *UNFINISHED_JOB_STATES))
                rows = rows.fetchall()
        return [_job_record(row) for row in rows]


# --- rows and checks --------------------------------------------------------------------


def _tenant(db: sqlite3.Connection, name: str) -> TenantRecord:
    row = db.execute("SELECT * FROM tenants WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"tenant {name!r} not found")
    return _tenant_record(row)


def _tenant_record(row: sqlite3.Row) -> TenantRecord:
    return TenantRecord(name=row["name"], admin=bool(row["admin"]),
                        quotas=Quotas(**json.loads(row["quotas"])), created=row["created"])


def _insert_tenant(db: sqlite3.Connection, record: TenantRecord) -> None:
    try:
        db.execute("INSERT INTO tenants (name, admin, quotas, created) VALUES (?, ?, ?, ?)",
                   (record.name, record.admin, _quotas_json(record.quotas), record.created))
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"tenant {record.name!r} already exists; accepted: a new name, or "
                            "set_quotas to change an existing tenant") from None


def _token_parts(token: str | None) -> tuple[str, str]:
    """(id, secret) of a preset token, or of a fresh one when `token` is None."""
    if token is None:
        return secrets.token_hex(6), secrets.token_urlsafe(32)
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise ValueError("a preset token must look like ct_<12 hex digits>_<43 of "
                         "A-Z a-z 0-9 _ ->, as `cotune tenants token issue` prints")
    return match[1], match[2]


def _insert_token(db: sqlite3.Connection, record: TokenRecord, secret: str) -> None:
    try:
        db.execute("INSERT INTO tokens (id, tenant, hash, description, created) "
                   "VALUES (?, ?, ?, ?, ?)", (record.id, record.tenant, _secret_hash(secret),
                                              record.description, record.created))
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"a token with id {record.id} exists already; accepted: a token "
                            "of a new id") from None


def _quotas_json(quotas: Quotas) -> str:
    return json.dumps(dataclasses.asdict(quotas))


def _adapter_id(db: sqlite3.Connection, tenant: str, name: str) -> int:
    row = db.execute("SELECT id FROM adapters WHERE tenant = ? AND name = ?",
                     (tenant, name)).fetchone()
    if row is None:
        raise NotFound(f"adapter {name!r} not found")
    return row["id"]


def _adapter_record(row: sqlite3.Row) -> AdapterRecord:
    return AdapterRecord(tenant=row["tenant"], name=row["name"], description=row["description"],
                         labels=json.loads(row["labels"]), latest_version=row["latest_version"],
                         version_count=row["version_count"], created=row["created"],
                         updated=row["updated"])


def _next_version(db: sqlite3.Connection, tenant: str, name: str) -> int:
    row = db.execute("SELECT next_version FROM version_counters WHERE tenant = ? AND name = ?",
                     (tenant, name)).fetchone()
    version = 1 if row is None else row[0]
    db.execute("INSERT OR REPLACE INTO version_counters (tenant, name, next_version) "
               "VALUES (?, ?, ?)", (tenant, name, version + 1))
    return version


def _job_record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(id=row["id"], tenant=row["tenant"], adapter=row["adapter"],
                     state=row["state"], spec=json.loads(row["spec"]), error=row["error"],
                     created=row["created"], updated=row["updated"],
                     versions=tuple(json.loads(row["versions"])),
                     progress=json.loads(row["progress"]), owner=row["owner"])


def _lora_shape(config_path: Path) -> tuple[int, float, tuple[str, ...]]:
    """(rank, alpha, target_modules) from adapter_config.json, with PEFT's defaults r=8 and
    lora_alpha=8; a target_modules regex string is kept as a list of that one string."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)
    return int(config.get("r", 8)), float(config.get("lora_alpha", 8)), tuple(targets)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _secret_hash(secret: str) -> str:
    # The secret is 32 random bytes, so a plain sha256 cannot be reversed by guessing: a slow
    # KDF (bcrypt, scrypt) only protects low-entropy secrets such as passwords.
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidName(f"invalid {kind} name {name!r}; accepted: {_NAMES_ACCEPTED}")


def _checked_quotas(quotas: Quotas) -> Quotas:
    for field in dataclasses.fields(Quotas):
        value = getattr(quotas, field.name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"quota {field.name}={value!r} is invalid; accepted: a whole "
                             "number >= 0 (0: no limit)")
    return quotas


def _checked_limit(limit: int) -> int:
    if limit < 1:
        raise ValueError(f"limit {limit} is invalid; accepted: a page of at least 1")
    return limit


def _checked_state(state: str) -> str:
    if state not in JOB_STATES:
        raise ValueError(f"job state {state!r} is invalid; accepted: {', '.join(JOB_STATES)}")
    return state


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        return False
    return True
