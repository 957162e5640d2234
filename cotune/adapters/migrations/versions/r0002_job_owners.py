"""Schema 2: jobs.owner, the worker that runs a job (its --worker-id); '' while none does.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

from cotune.adapters.migrations import TEXT

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("owner", TEXT, nullable=False, server_default=""))
