"""The tokens each worker's tenants used in the last minute, exchanged through the registry so
that max_tokens_per_minute holds across a cluster (approximately: see exchange_token_usage)."""

from __future__ import annotations

from cotune.adapters.sql_database import SqlDatabase

USAGE_WINDOW_S = 60.0


class SqlUsage(SqlDatabase):
    def exchange_token_usage(self, worker: str, used: dict[str, int],
                             now: float) -> dict[str, int]:
        with self._transaction(write=True) as db:
            db.execute("DELETE FROM token_usage WHERE worker = ? OR reported < ?",
                       (worker, now - 2 * USAGE_WINDOW_S))  # the old report, and dead workers'
            for tenant, tokens in used.items():
                if tokens > 0:
                    db.execute("INSERT INTO token_usage (worker, tenant, tokens, reported) "
                               "VALUES (?, ?, ?, ?)", (worker, tenant, tokens, now))
            rows = db.execute("SELECT tenant, SUM(tokens) FROM token_usage WHERE worker != ? "
                              "AND reported > ? GROUP BY tenant",
                              (worker, now - USAGE_WINDOW_S)).fetchall()
        return {row[0]: int(row[1]) for row in rows}
