"""Schema 3: tenants.deleted. A deleted tenant's row stays (deleted = 1) for its
version_counters: a tenant created again under the name never reuses a version number, which
the runtime's caches key weights by.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.add_column("tenants", sa.Column("deleted", sa.Integer, nullable=False,
                                       server_default="0"))
