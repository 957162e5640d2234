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
sqlite_versions (adapters and versions) and sqlite_jobs (jobs and their owners).
"""

from __future__ import annotations

from cotune.adapters.sqlite_jobs import SqliteJobs
from cotune.adapters.sqlite_tenants import SqliteTenants
from cotune.adapters.sqlite_versions import SqliteVersions


class SqliteRegistry(SqliteTenants, SqliteVersions, SqliteJobs):
    """The Registry on one SQLite file; safe to call from any thread."""
