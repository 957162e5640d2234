"""The registry on a SQL database: SQLite embedded (data_dir/registry.sqlite3), PostgreSQL for
workers on several nodes; version files in data_dir/blobs and uploaded files in data_dir/files.

One module per concern, joined here into one class per backend: sql_database (the stores and
the transactions, the SQL both backends share), sqlite_database and postgres_database (each
backend's connection, transactions and open), schema_migrations (the schema, by Alembic),
sql_tenants (tenants and tokens), sql_versions (adapters and versions), sql_jobs (jobs, their
owners and events), sql_files (uploaded files), sql_idempotency (the keys that make creating
calls safe to retry) and sql_usage (the tokens per minute of a cluster); the deletion of a
tenant, which spans them all, is here.
"""

from __future__ import annotations

from pathlib import Path

from cotune.adapters.postgres_database import PostgresDatabase
from cotune.adapters.registry import NO_LIMITS, FailedPrecondition, Quotas, TenantDeletion
from cotune.adapters.sql_files import SqlFiles
from cotune.adapters.sql_idempotency import SqlIdempotency
from cotune.adapters.sql_jobs import SqlJobs, job_record
from cotune.adapters.sql_tenants import SqlTenants, load_tenant
from cotune.adapters.sql_usage import SqlUsage
from cotune.adapters.sql_versions import SqlVersions
from cotune.adapters.sqlite_database import SqliteDatabase
from cotune.adapters.stores import Stores


def open_registry(url: str, data_dir: Path, default_quotas: Quotas = NO_LIMITS,
                  stores: Stores | None = None) -> SqlRegistry:
    """The registry at `url`, a postgresql:// URL, or when it is "", the embedded SQLite
    registry in data_dir; the bytes of its versions and files in `stores` (None: data_dir's
    directories)."""
    if not url:
        return SqliteRegistry(data_dir, default_quotas, stores)
    return PostgresRegistry(url, data_dir, default_quotas, stores)


class SqlRegistry(SqlTenants, SqlVersions, SqlJobs, SqlFiles, SqlIdempotency, SqlUsage):
    """The Registry's calls on a database of either backend; safe to call from any thread."""

    def delete_tenant(self, name: str) -> TenantDeletion:
        with self._transaction(write=True) as db:
            if load_tenant(db, name).admin:
                raise FailedPrecondition(
                    f"tenant {name!r} is an admin tenant, and admin tenants cannot be deleted "
                    "(the server must keep its admins); accepted: a tenant without admin "
                    "rights (revoke an admin's tokens to shut it out)")
            jobs = tuple(job_record(row) for row in db.execute(
                "SELECT * FROM jobs WHERE tenant = ? ORDER BY created, id", (name,)))
            blob_ids = [row[0] for row in db.execute(
                "SELECT v.blob_id FROM versions v JOIN adapters a ON a.id = v.adapter_id "
                "WHERE a.tenant = ?", (name,))]
            adapters = db.execute("DELETE FROM adapters WHERE tenant = ?",  # versions cascade
                                  (name,)).rowcount
            tokens = db.execute("DELETE FROM tokens WHERE tenant = ?", (name,)).rowcount
            db.execute("DELETE FROM jobs WHERE tenant = ?", (name,))  # their events cascade
            file_ids = [row[0] for row in db.execute("SELECT id FROM files WHERE tenant = ?",
                                                     (name,))]
            db.execute("DELETE FROM files WHERE tenant = ?", (name,))
            db.execute("DELETE FROM idempotency_keys WHERE tenant = ?", (name,))
            db.execute("DELETE FROM token_usage WHERE tenant = ?", (name,))
            db.execute("UPDATE tenants SET deleted = 1 WHERE name = ?", (name,))
        # after the commit: a crash here leaves blobs and files the sweep removes
        for blob_id in blob_ids:
            self._blobs.remove(blob_id)
        for file_id in file_ids:
            self._files.remove(file_id)
        return TenantDeletion(adapters=adapters, versions=len(blob_ids), tokens=tokens, jobs=jobs,
                              files=len(file_ids))


class SqliteRegistry(SqlRegistry, SqliteDatabase):
    """The embedded registry, on one SQLite file."""


class PostgresRegistry(SqlRegistry, PostgresDatabase):
    """The cluster's registry, on a PostgreSQL database."""
