"""The embedded backend of the registry: SQLite in data_dir/registry.sqlite3.

The database runs in WAL mode with synchronous=FULL, so a committed call survives a crash. One
connection serves every thread of the server, guarded by a lock, and a writer's transaction
begins IMMEDIATE: it takes SQLite's write lock, which spans processes, at its first statement.
Several workers may share one data_dir this way (the processes behind one router, on one host);
SQLite's WAL needs memory shared by the processes, so they must share a host (a local directory
or a volume mounted on one node), not a network filesystem. Workers on several nodes use the
PostgreSQL backend.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from cotune.adapters.registry import NO_LIMITS, Quotas
from cotune.adapters.schema_migrations import migrate
from cotune.adapters.sql_database import SqlDatabase
from cotune.adapters.stores import Stores


class SqliteDatabase(SqlDatabase):
    label_match = "EXISTS (SELECT 1 FROM json_each(a.labels) WHERE key = ? AND value = ?)"

    def __init__(self, data_dir: Path, default_quotas: Quotas = NO_LIMITS,
                 stores: Stores | None = None):
        super().__init__(data_dir, default_quotas, stores)
        self.path = self.data_dir / "registry.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False,
                                   isolation_level=None)
        try:
            self._db.row_factory = sqlite3.Row
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
                self._db.execute(f"PRAGMA {pragma}")
            _migrate(self.path)
            self._open_stores()
        except BaseException:
            self.close()
            raise

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[sqlite3.Connection]:
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
        super().close()


def _migrate(path: Path) -> None:
    """Alembic's run on a connection of its own, whose transactions begin IMMEDIATE (Python's
    sqlite3 would otherwise run the DDL outside any transaction)."""
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.NullPool,
                              connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _manual_transactions(connection, _record) -> None:
        connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _take_the_write_lock(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    try:
        migrate(engine, str(path))
    finally:
        engine.dispose()
