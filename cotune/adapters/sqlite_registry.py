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

One module per concern, joined here into one class: sqlite_schema (the schema, the connection
and its transactions, the open and its sweep), sqlite_tenants (tenants and tokens),
sqlite_versions (adapters and versions), sqlite_jobs (jobs, their owners and events) and
sqlite_files (uploaded files); the deletion of a tenant, which spans them all, is here.
"""

from __future__ import annotations

from cotune.adapters.registry import FailedPrecondition, TenantDeletion
from cotune.adapters.sqlite_files import SqliteFiles
from cotune.adapters.sqlite_jobs import SqliteJobs, job_record
from cotune.adapters.sqlite_tenants import SqliteTenants, load_tenant
from cotune.adapters.sqlite_versions import SqliteVersions


class SqliteRegistry(SqliteTenants, SqliteVersions, SqliteJobs, SqliteFiles):
    """The Registry on one SQLite file; safe to call from any thread."""

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
            db.execute("UPDATE tenants SET deleted = 1 WHERE name = ?", (name,))
        # after the commit: a crash here leaves blobs and files the sweep removes
        for blob_id in blob_ids:
            self._blobs.remove(blob_id)
        for file_id in file_ids:
            self._files.remove(file_id)
        return TenantDeletion(adapters=adapters, versions=len(blob_ids), tokens=tokens, jobs=jobs,
                              files=len(file_ids))
