"""The registry's schema as Alembic migrations, one history for both backends (SQLite and
PostgreSQL); `cotune.adapters.schema_migrations` runs them at every open.

A new revision: a file in versions/ whose `down_revision` is the newest one's, written with
Alembic's operations (`op.add_column`, `op.create_table`) and the column types below, so that
both backends get it. A revision is never edited once released, and a registry only moves
forward (no downgrades)."""

import sqlalchemy as sa

# A SQLite registry's `PRAGMA user_version` once it is Alembic's: the cotune of the days before
# kept its schema version (1-4) there, and refuses this one as newer than its own.
MANAGED_BY_ALEMBIC = 5

# Text compares and sorts byte by byte on both backends (SQLite's BINARY collation), so that
# pages ordered by name are the same whatever the collation of a PostgreSQL database is.
TEXT = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
