"""Idempotency keys in the registry: what the first creating call with a tenant's key created,
kept IDEMPOTENCY_KEPT_S, so that its retries answer that instead of creating again.

The key is read and recorded in the creating call's own write transaction, which every other
writer waits for: of two calls with one key, even at once on two workers, the second to commit
finds the first's row and creates nothing (Repeated)."""

from __future__ import annotations

import json
import time

from cotune.adapters.registry import (
    IDEMPOTENCY_KEPT_S,
    IDEMPOTENT_CALLS,
    Idempotency,
    JobRecord,
    VersionRecord,
)
from cotune.adapters.sql_database import Connection, SqlDatabase


class SqlIdempotency(SqlDatabase):
    """The Registry's `repeated`; the record families call `earlier` and `remember`."""

    def repeated(self, tenant: str, call: str,
                 idempotency: Idempotency) -> VersionRecord | JobRecord | None:
        with self._transaction() as db:
            result = earlier(db, tenant, call, idempotency)
        if result is None:
            return None
        if call == "CreateJob":
            return self.get_job(tenant, result["job"])
        return self.get_version(tenant, result["adapter"], result["version"])


def earlier(db: Connection, tenant: str, call: str, idempotency: Idempotency) -> dict | None:
    """What the tenant's earlier `call` with the key created (as `remember` stored it), or
    None; ValueError when that call's request was another."""
    if call not in IDEMPOTENT_CALLS:
        raise ValueError(f"call {call!r} takes no idempotency key; accepted: "
                         f"{', '.join(IDEMPOTENT_CALLS)}")
    row = db.execute("SELECT fingerprint, result FROM idempotency_keys WHERE tenant = ? AND "
                     "call = ? AND key = ? AND created > ?",
                     (tenant, call, idempotency.key, time.time() - IDEMPOTENCY_KEPT_S)
                     ).fetchone()
    if row is None:
        return None
    if row["fingerprint"] != idempotency.fingerprint:
        raise ValueError(f"idempotency key {idempotency.key!r} was used by another {call} "
                         "request in the last 24 hours; accepted: the same key only to retry "
                         "the same request, a new key for a new one")
    return json.loads(row["result"])


def remember(db: Connection, tenant: str, call: str, idempotency: Idempotency,
             result: dict, now: float) -> None:
    """Records what this call created under its key, in its write transaction (and forgets
    the keys past their time, the tenant's and everyone's)."""
    db.execute("DELETE FROM idempotency_keys WHERE created <= ?", (now - IDEMPOTENCY_KEPT_S,))
    db.execute("INSERT INTO idempotency_keys (tenant, call, key, fingerprint, result, created) "
               "VALUES (?, ?, ?, ?, ?, ?)", (tenant, call, idempotency.key,
                                             idempotency.fingerprint, json.dumps(result), now))
