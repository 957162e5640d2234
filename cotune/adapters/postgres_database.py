"""The cluster backend of the registry: PostgreSQL, shared by every worker of a cluster.

`url` is libpq's (`postgresql://user@host:5432/db?sslmode=require`). The password may be in it,
and is better kept out of it: libpq reads $PGPASSWORD and the file $PGPASSFILE (~/.pgpass by
default), and the chart passes the URL from a Secret. Errors and logs name the registry by the
URL with its password hidden.

Connections come from a pool (SQLAlchemy's, pinged before use, so that a server restart costs
the next call nothing but a reconnect). A writer's transaction takes one advisory lock first,
the same for every writer of the database, which makes the writes of all workers one sequence,
as SQLite's write lock does: the registry's writes are few and short (a publish copies its
files before the transaction). A reader's transaction is REPEATABLE READ and READ ONLY: one
snapshot for all of its statements, and no lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psycopg
import sqlalchemy as sa

from cotune.adapters.registry import NO_LIMITS, Quotas, RegistryUnavailable
from cotune.adapters.schema_migrations import migrate
from cotune.adapters.sql_database import SqlDatabase
from cotune.adapters.stores import Stores

# Any fixed number, other than the migrations' lock: the key of the writers' advisory lock.
_WRITE_LOCK = 0x636F74756E6577  # "cotunew"
_SCHEMES = ("postgresql", "postgres")


class PostgresDatabase(SqlDatabase):
    label_match = "(a.labels::jsonb ->> ?) = ?"

    def __init__(self, url: str, data_dir: Path, default_quotas: Quotas = NO_LIMITS,
                 stores: Stores | None = None, pool_size: int = 8):
        super().__init__(data_dir, default_quotas, stores)
        parsed = sa.engine.make_url(url)
        if parsed.drivername not in _SCHEMES:
            raise ValueError(f"registry URL scheme {parsed.drivername!r} is not PostgreSQL's; "
                             f"accepted: {' or '.join(s + '://' for s in _SCHEMES)}...")
        self.where = parsed.render_as_string(hide_password=True)
        self._engine = sa.create_engine(parsed.set(drivername="postgresql+psycopg"),
                                        pool_size=pool_size, max_overflow=pool_size,
                                        pool_pre_ping=True, pool_timeout=30)
        try:
            migrate(self._engine, self.where)
            self._open_stores()
        except BaseException:
            self.close()
            raise

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[_Connection]:
        try:
            with self._pooled_transaction(write) as connection:
                yield connection
        except (psycopg.OperationalError, sa.exc.OperationalError, sa.exc.TimeoutError) as error:
            reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
            raise RegistryUnavailable(
                f"the registry {self.where} is unavailable ({reason}); nothing was changed, "
                "and the call may be retried once the database is back") from error

    @contextmanager
    def _pooled_transaction(self, write: bool) -> Iterator[_Connection]:
        pooled = self._engine.raw_connection()
        try:
            connection: psycopg.Connection = pooled.driver_connection
            if write:
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            else:
                connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                yield _Connection(connection)
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
        finally:
            pooled.close()  # back to the pool

    def close(self) -> None:
        self._engine.dispose()
        super().close()


class Row(tuple):
    """A row by position or by column name, as sqlite3.Row."""

    def __new__(cls, values: Sequence, columns: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row.columns = columns
        return row

    def __getitem__(self, key):
        return super().__getitem__(self.columns[key] if isinstance(key, str) else key)


def _rows(cursor: psycopg.Cursor) -> Callable[[Sequence], Row]:
    columns = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(values, columns)


class _Connection:
    """The families' SQL on psycopg: `?` placeholders become psycopg's `%s`."""

    def __init__(self, connection: psycopg.Connection):
        self._connection = connection

    def execute(self, sql: str, params: Sequence = ()) -> psycopg.Cursor:
        cursor = self._connection.cursor(row_factory=_rows)
        return cursor.execute(sql.replace("%", "%%").replace("?", "%s"), params)
