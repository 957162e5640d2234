"""Alembic's entry: runs the migrations on the connection that schema_migrations passes in
`config.attributes["connection"]`, in one transaction that holds the backend's write lock, so
that of workers opening one registry together exactly one migrates it (the others wait, then
find it at the head).

A SQLite registry from before Alembic carries its schema version (1-4) in `PRAGMA
user_version`; it is stamped with that revision first, then migrated like any other."""

from alembic import context
from sqlalchemy import inspect, text

from cotune.adapters.migrations import MANAGED_BY_ALEMBIC

# Any fixed number: the key of the PostgreSQL advisory lock that migrations hold.
MIGRATION_LOCK = 0x636F74756E65  # "cotune"

connection = context.config.attributes["connection"]
# one transaction for every step, on SQLite too (whose DDL Alembic would commit step by step)
context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":  # SQLite's BEGIN IMMEDIATE took its lock
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    else:
        before_alembic = connection.execute(text("PRAGMA user_version")).scalar_one()
        if 0 < before_alembic < MANAGED_BY_ALEMBIC and \
                not inspect(connection).has_table("alembic_version"):
            context.get_context().stamp(context.script, f"{before_alembic:04d}")
    context.run_migrations()
    if connection.dialect.name == "sqlite":
        connection.execute(text(f"PRAGMA user_version = {MANAGED_BY_ALEMBIC}"))
