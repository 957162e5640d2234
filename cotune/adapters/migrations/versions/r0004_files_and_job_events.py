"""Schema 4: uploaded files, the events of jobs (what ListJobEvents shows after the fact), and
jobs.training_file, the id of the file a job trains on.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

from cotune.adapters.migrations import TEXT

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("training_file", TEXT, nullable=False, server_default=""))
    op.create_table(  # a job's events go with it (its tenant's deletion)
        "job_events",
        sa.Column("job_id", TEXT, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("sequence", sa.Integer, primary_key=True),  # from 1 per job
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("kind", TEXT, nullable=False),
        sa.Column("data", TEXT, nullable=False))  # JSON object
    op.create_table(  # a file's bytes are written before its row and removed after it
        "files",
        sa.Column("id", TEXT, primary_key=True),
        sa.Column("tenant", TEXT, sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("filename", TEXT, nullable=False),
        sa.Column("purpose", TEXT, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Float, nullable=False))
    op.create_index("files_by_tenant", "files", ["tenant", "created", "id"])
