"""Schema 1: tenants and their tokens, adapters with their versions, jobs.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

from cotune.adapters.migrations import TEXT

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", TEXT, primary_key=True),
        sa.Column("admin", sa.Integer, nullable=False),
        sa.Column("quotas", TEXT, nullable=False),  # JSON of Quotas
        sa.Column("created", sa.Float, nullable=False))
    op.create_table(
        "tokens",
        sa.Column("id", TEXT, primary_key=True),
        sa.Column("tenant", TEXT, sa.ForeignKey("tenants.name"), nullable=False),
        # sha256 hex of the secret, which itself is never stored
        sa.Column("hash", TEXT, nullable=False),
        sa.Column("description", TEXT, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("revoked", sa.Integer, nullable=False, server_default="0"))
    op.create_index("tokens_by_tenant", "tokens", ["tenant"])
    op.create_table(  # a row exists while the adapter has a version
        "adapters",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant", TEXT, sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("name", TEXT, nullable=False),
        sa.Column("description", TEXT, nullable=False),
        sa.Column("labels", TEXT, nullable=False),  # JSON object of strings
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
        sa.UniqueConstraint("tenant", "name"))
    # The next version of every adapter name a tenant ever published. Kept apart from
    # adapters, whose row goes with the last version, so that a version number is never reused.
    op.create_table(
        "version_counters",
        sa.Column("tenant", TEXT, sa.ForeignKey("tenants.name"), primary_key=True),
        sa.Column("name", TEXT, primary_key=True),
        sa.Column("next_version", sa.Integer, nullable=False))
    op.create_table(
        "versions",
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("alpha", sa.Float, nullable=False),
        sa.Column("target_modules", TEXT, nullable=False),  # JSON list of strings
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", TEXT, nullable=False),  # of adapter_model.safetensors
        sa.Column("provenance", TEXT, nullable=False),  # JSON object
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("blob_id", TEXT, nullable=False, unique=True))
    op.create_table(
        "jobs",
        sa.Column("id", TEXT, primary_key=True),
        sa.Column("tenant", TEXT, sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("adapter", TEXT, nullable=False),
        sa.Column("state", TEXT, nullable=False),
        sa.Column("spec", TEXT, nullable=False),  # JSON object
        sa.Column("error", TEXT, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
        sa.Column("versions", TEXT, nullable=False),  # JSON list of the versions it published
        sa.Column("progress", TEXT, nullable=False))  # JSON object, the latest report
    op.create_index("jobs_by_tenant", "jobs", ["tenant", "created", "id"])
    op.create_index("jobs_by_state", "jobs", ["state", "created", "id"])
