"""Adapters and their versions in the registry: a version's row in the database, its files a
blob of the BlobStore (in which order the two are written: sql_database)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import BinaryIO

from cotune.adapters.blob_store import CONFIG_NAME, FILES, WEIGHTS_NAME
from cotune.adapters.registry import (
    AdapterRecord,
    FailedPrecondition,
    Idempotency,
    NotFound,
    QuotaExceeded,
    Quotas,
    Repeated,
    VersionRecord,
)
from cotune.adapters.sql_database import (
    Connection,
    Row,
    SqlDatabase,
    check_name,
    checked_limit,
)
from cotune.adapters.sql_idempotency import earlier, remember
from cotune.adapters.sql_tenants import load_tenant

_ADAPTERS = """
SELECT a.tenant, a.name, a.description, a.labels, a.created, a.updated,
       MAX(v.version) AS latest_version, COUNT(*) AS version_count
FROM adapters a JOIN versions v ON v.adapter_id = a.id
WHERE {where} GROUP BY a.id ORDER BY a.name LIMIT ?"""
_VERSIONS = """
SELECT a.tenant, a.name, v.* FROM versions v JOIN adapters a ON a.id = v.adapter_id
WHERE {where} ORDER BY v.version {order} LIMIT ?"""


class SqlVersions(SqlDatabase):
    """The adapter and version calls of the Registry."""

    def publish_version(self, tenant: str, name: str, files: Path, provenance: dict,
                        description: str | None = None,
                        labels: dict[str, str] | None = None,
                        idempotency: Idempotency | None = None,
                        job_owner: tuple[str, str] | None = None,
                        call: str = "CreateAdapter") -> VersionRecord:
        check_name("adapter", name)
        provenance_json = json.dumps(provenance)
        rank, alpha, target_modules = _lora_shape(Path(files) / CONFIG_NAME)
        size_bytes = sum((Path(files) / file).stat().st_size for file in FILES)
        sha256 = _file_sha256(Path(files) / WEIGHTS_NAME)
        blob_id = self._blobs.publish(files)
        try:
            now = time.time()
            with self._transaction(write=True) as db:
                if idempotency is not None and \
                        (done := earlier(db, tenant, call, idempotency)):
                    row = db.execute(_VERSIONS.format(
                        where="a.tenant = ? AND a.name = ? AND v.version = ?", order="ASC"),
                        (tenant, done["adapter"], done["version"], 1)).fetchone()
                    if row is None:
                        raise NotFound(f"version {done['version']} of adapter "
                                       f"{done['adapter']!r}, which the first call with "
                                       "this idempotency key created, was deleted since")
                    raise Repeated(_version_record(row))
                if job_owner is not None:
                    _check_job_owner(db, *job_owner)
                quotas = load_tenant(db, tenant).quotas
                adapter_id = self._adapter_for_new_version(db, tenant, name, quotas, now,
                                                           description, labels)
                version = _next_version(db, tenant, name)
                db.execute("INSERT INTO versions (adapter_id, version, rank, alpha, "
                           "target_modules, size_bytes, sha256, provenance, created, blob_id) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (adapter_id, version, rank, alpha, json.dumps(target_modules),
                            size_bytes, sha256, provenance_json, now, blob_id))
                if idempotency is not None:
                    remember(db, tenant, call, idempotency,
                             {"adapter": name, "version": version}, now)
        except BaseException:
            self._blobs.remove(blob_id)
            raise
        return VersionRecord(tenant=tenant, name=name, version=version, rank=rank, alpha=alpha,
                             target_modules=target_modules, size_bytes=size_bytes, sha256=sha256,
                             provenance=json.loads(provenance_json), created=now,
                             blob_id=blob_id)

    def _adapter_for_new_version(self, db: Connection, tenant: str, name: str,
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
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (tenant, name, description or "", json.dumps(labels or {}), now,
                 now)).fetchone()[0]
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
        where = ["a.tenant = ?", "a.name > ?", "substr(a.name, 1, CAST(? AS INTEGER)) = ?"]
        params: list = [tenant, after or "", len(name_prefix), name_prefix]
        for key, value in (labels or {}).items():
            where.append(self.label_match)
            params += [key, value]
        with self._transaction() as db:
            rows = db.execute(_ADAPTERS.format(where=" AND ".join(where)),
                              (*params, checked_limit(limit))).fetchall()
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
        return _version_record(row)

    def list_versions(self, tenant: str, name: str, after: int | None = None,
                      limit: int = 50) -> list[VersionRecord]:
        with self._transaction() as db:
            _adapter_id(db, tenant, name)
            rows = db.execute(
                _VERSIONS.format(where="a.tenant = ? AND a.name = ? AND v.version > ?",
                                 order="ASC"),
                (tenant, name, after or 0, checked_limit(limit))).fetchall()
        return [_version_record(row) for row in rows]

    def version_dir(self, version: VersionRecord) -> Path:
        return self._blobs.directory(version.blob_id)

    def open_version_file(self, version: VersionRecord, name: str) -> BinaryIO:
        return self._blobs.open(version.blob_id, name)

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



def _version_record(row: Row) -> VersionRecord:
    return VersionRecord(
        tenant=row["tenant"], name=row["name"], version=row["version"], rank=row["rank"],
        alpha=row["alpha"], target_modules=tuple(json.loads(row["target_modules"])),
        size_bytes=row["size_bytes"], sha256=row["sha256"],
        provenance=json.loads(row["provenance"]), created=row["created"],
        blob_id=row["blob_id"])


def _check_job_owner(db: Connection, job_id: str, worker: str) -> None:
    row = db.execute("SELECT owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise NotFound(f"job {job_id!r} not found")
    if row["owner"] != worker:
        raise FailedPrecondition(f"job {job_id} runs on worker {row['owner']!r} now, no "
                                 f"longer on {worker!r}, which publishes its versions no more")


def _adapter_id(db: Connection, tenant: str, name: str) -> int:
    row = db.execute("SELECT id FROM adapters WHERE tenant = ? AND name = ?",
                     (tenant, name)).fetchone()
    if row is None:
        raise NotFound(f"adapter {name!r} not found")
    return row["id"]


def _adapter_record(row: Row) -> AdapterRecord:
    return AdapterRecord(tenant=row["tenant"], name=row["name"], description=row["description"],
                         labels=json.loads(row["labels"]), latest_version=row["latest_version"],
                         version_count=row["version_count"], created=row["created"],
                         updated=row["updated"])


def _next_version(db: Connection, tenant: str, name: str) -> int:
    row = db.execute("SELECT next_version FROM version_counters WHERE tenant = ? AND name = ?",
                     (tenant, name)).fetchone()
    version = 1 if row is None else row[0]
    db.execute("INSERT INTO version_counters (tenant, name, next_version) VALUES (?, ?, ?) "
               "ON CONFLICT (tenant, name) DO UPDATE SET next_version = excluded.next_version",
               (tenant, name, version + 1))
    return version


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
