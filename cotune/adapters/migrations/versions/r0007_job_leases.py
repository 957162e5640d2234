"""Schema 7: jobs.lease_until, when the lease of the job's owner ends unless the owner renews
it; past it, another worker of the cluster takes the job over and resumes it.

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("lease_until", sa.Float, nullable=False,
                                    server_default="0"))
