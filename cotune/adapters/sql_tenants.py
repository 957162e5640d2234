"""Tenants and their tokens in the registry. A token is ct_<id>_<secret>; the database
keeps the sha256 of the secret only, and a token is checked against it at every call. A deleted
tenant's row stays, marked deleted (see the schema), and is found by no call."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import time

from cotune.adapters.registry import AlreadyExists, NotFound, Quotas, TenantRecord, TokenRecord
from cotune.adapters.sql_database import (
    Connection,
    Row,
    SqlDatabase,
    check_name,
    checked_limit,
    checked_quotas,
)

_TOKEN = re.compile(r"ct_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")  # ct_<id>_<token_urlsafe(32)>


class SqlTenants(SqlDatabase):
    """The tenant and token calls of the Registry."""

    def create_tenant(self, name: str, admin: bool = False,
                      quotas: Quotas | None = None) -> TenantRecord:
        check_name("tenant", name)
        record = TenantRecord(name=name, admin=bool(admin), created=time.time(),
                              quotas=checked_quotas(
                                  self.default_quotas if quotas is None else quotas))
        with self._transaction(write=True) as db:
            if _is_deleted(db, name):  # the name again: the row (and its counters) serve anew
                db.execute("UPDATE tenants SET admin = ?, quotas = ?, created = ?, deleted = 0 "
                           "WHERE name = ?", (int(record.admin), _quotas_json(record.quotas),
                                              record.created, name))
            else:
                _insert_tenant(db, record)
        return record

    def get_tenant(self, name: str) -> TenantRecord:
        with self._transaction() as db:
            return load_tenant(db, name)

    def list_tenants(self, after: str | None = None, limit: int = 50) -> list[TenantRecord]:
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM tenants WHERE name > ? AND deleted = 0 "
                              "ORDER BY name LIMIT ?", (after or "", checked_limit(limit)))
            rows = rows.fetchall()
        return [_tenant_record(row) for row in rows]

    def set_quotas(self, name: str, quotas: Quotas) -> TenantRecord:
        quotas = checked_quotas(quotas)
        with self._transaction(write=True) as db:
            load_tenant(db, name)
            db.execute("UPDATE tenants SET quotas = ? WHERE name = ?",
                       (_quotas_json(quotas), name))
            return load_tenant(db, name)

    def issue_token(self, tenant: str, description: str = "",
                    token: str | None = None) -> tuple[TokenRecord, str]:
        token_id, secret = _token_parts(token)
        record = TokenRecord(id=token_id, tenant=tenant, description=description,
                             created=time.time(), revoked=False)
        with self._transaction(write=True) as db:
            load_tenant(db, tenant)
            _insert_token(db, record, secret)
        return record, f"ct_{token_id}_{secret}"

    def bootstrap_admin(self, token: str | None = None) -> str | None:
        token_id, secret = _token_parts(token)
        now = time.time()
        with self._transaction(write=True) as db:
            if db.execute("SELECT 1 FROM tenants LIMIT 1").fetchone() is not None:
                return None
            _insert_tenant(db, TenantRecord(name="admin", admin=True, quotas=Quotas(),
                                            created=now))
            _insert_token(db, TokenRecord(id=token_id, tenant="admin", created=now,
                                          description="created at the first start",
                                          revoked=False), secret)
        return f"ct_{token_id}_{secret}"

    def revoke_token(self, token_id: str) -> bool:
        with self._transaction(write=True) as db:
            row = db.execute("SELECT revoked FROM tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                raise NotFound(f"token id {token_id!r} not found; accepted: the id of a token "
                               "issued on this server (a tenant's tokens are listed with it)")
            db.execute("UPDATE tokens SET revoked = 1 WHERE id = ?", (token_id,))
            return not row["revoked"]

    def tokens(self, tenant: str) -> list[TokenRecord]:
        with self._transaction() as db:
            load_tenant(db, tenant)
            rows = db.execute("SELECT * FROM tokens WHERE tenant = ? ORDER BY created, id",
                              (tenant,)).fetchall()
        return [TokenRecord(id=row["id"], tenant=row["tenant"], description=row["description"],
                            created=row["created"], revoked=bool(row["revoked"])) for row in rows]

    def authenticate(self, token: str) -> TenantRecord | None:
        match = _TOKEN.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            return None
        token_id, secret = match.groups()
        with self._transaction() as db:
            row = db.execute("SELECT t.hash, t.revoked, n.* FROM tokens t "
                             "JOIN tenants n ON n.name = t.tenant WHERE t.id = ?",
                             (token_id,)).fetchone()
        if row is None or row["revoked"]:
            return None
        if not hmac.compare_digest(row["hash"], _secret_hash(secret)):
            return None
        return _tenant_record(row)


def load_tenant(db: Connection, name: str) -> TenantRecord:
    """The tenant `name`, read in the caller's transaction; NotFound when there is none."""
    row = db.execute("SELECT * FROM tenants WHERE name = ? AND deleted = 0", (name,)).fetchone()
    if row is None:
        raise NotFound(f"tenant {name!r} not found")
    return _tenant_record(row)


def _is_deleted(db: Connection, name: str) -> bool:
    row = db.execute("SELECT deleted FROM tenants WHERE name = ?", (name,)).fetchone()
    return row is not None and bool(row["deleted"])


def _tenant_record(row: Row) -> TenantRecord:
    return TenantRecord(name=row["name"], admin=bool(row["admin"]),
                        quotas=Quotas(**json.loads(row["quotas"])), created=row["created"])


def _insert_tenant(db: Connection, record: TenantRecord) -> None:
    """In a write transaction: the check and the insert are one step for every other writer."""
    if db.execute("SELECT 1 FROM tenants WHERE name = ?", (record.name,)).fetchone():
        raise AlreadyExists(f"tenant {record.name!r} already exists; accepted: a new name, or "
                            "set_quotas to change an existing tenant")
    db.execute("INSERT INTO tenants (name, admin, quotas, created) VALUES (?, ?, ?, ?)",
               (record.name, int(record.admin), _quotas_json(record.quotas), record.created))


def _token_parts(token: str | None) -> tuple[str, str]:
    """(id, secret) of a preset token, or of a fresh one when `token` is None."""
    if token is None:
        return secrets.token_hex(6), secrets.token_urlsafe(32)
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise ValueError("a preset token must look like ct_<12 hex digits>_<43 of "
                         "A-Z a-z 0-9 _ ->, as `cotune tenants token issue` prints")
    return match[1], match[2]


def _insert_token(db: Connection, record: TokenRecord, secret: str) -> None:
    """In a write transaction, as _insert_tenant."""
    if db.execute("SELECT 1 FROM tokens WHERE id = ?", (record.id,)).fetchone():
        raise AlreadyExists(f"a token with id {record.id} exists already; accepted: a token "
                            "of a new id")
    db.execute("INSERT INTO tokens (id, tenant, hash, description, created) "
               "VALUES (?, ?, ?, ?, ?)", (record.id, record.tenant, _secret_hash(secret),
                                          record.description, record.created))


def _quotas_json(quotas: Quotas) -> str:
    return json.dumps(dataclasses.asdict(quotas))


def _secret_hash(secret: str) -> str:
    # The secret is 32 random bytes, so a plain sha256 cannot be reversed by guessing: a slow
    # KDF (bcrypt, scrypt) only protects low-entropy secrets such as passwords.
    return hashlib.sha256(secret.encode("ascii")).hexdigest()
