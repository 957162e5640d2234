"""Schema 6: each worker's latest report of the tokens each tenant used on it in the last
minute, from which every worker counts the cluster's use of max_tokens_per_minute.

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op

from cotune.adapters.migrations import TEXT

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "token_usage",
        sa.Column("worker", TEXT, primary_key=True),
        sa.Column("tenant", TEXT, primary_key=True),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("reported", sa.Float, nullable=False))
