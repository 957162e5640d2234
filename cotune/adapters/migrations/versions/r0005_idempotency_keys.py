"""Schema 5: the idempotency keys of creating calls (CreateAdapter, CreateJob): what the first
call with a tenant's key created, so that a retry answers it instead of creating again.

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op

from cotune.adapters.migrations import TEXT

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant", TEXT, sa.ForeignKey("tenants.name"), primary_key=True),
        sa.Column("call", TEXT, primary_key=True),
        sa.Column("key", TEXT, primary_key=True),
        sa.Column("fingerprint", TEXT, nullable=False),  # of the first call's request
        sa.Column("result", TEXT, nullable=False),  # JSON: what the first call created
        sa.Column("created", sa.Float, nullable=False))
    op.create_index("idempotency_keys_by_age", "idempotency_keys", ["created"])
