"""Schema 8: the max_sessions quota (RL sessions a tenant keeps open at once on a server) in
every tenant's quotas. A tenant made before it gets DEFAULT_MAX_SESSIONS, the default of
--default-max-sessions, except one with no limit at all (the bootstrapped admin), which keeps
none. The quotas are a JSON column: the change is to its data, done the same on both backends.

Revision ID: 0008
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"

DEFAULT_MAX_SESSIONS = 4  # as `cotune serve --default-max-sessions` has it at this revision


def upgrade() -> None:
    db = op.get_bind()
    rows = db.execute(sa.text("SELECT name, quotas FROM tenants")).fetchall()
    for name, text in rows:
        quotas = json.loads(text)
        if "max_sessions" in quotas:
            continue
        unlimited = not any(quotas.values())
        quotas["max_sessions"] = 0 if unlimited else DEFAULT_MAX_SESSIONS
        db.execute(sa.text("UPDATE tenants SET quotas = :quotas WHERE name = :name"),
                   {"quotas": json.dumps(quotas), "name": name})
