"""The registry's tenants and tokens: names, quotas, token secrets, and tenants that see
nothing of each other; on both backends (real SQLite and a real PostgreSQL server)."""

from __future__ import annotations

import json

import pytest
from registry_helpers import UPLOAD, blob_dirs

from cotune.adapters.registry import (
    AlreadyExists,
    FailedPrecondition,
    InvalidName,
    NotFound,
    Quotas,
)

pytest_plugins = ["registry_fixtures"]  # files, data_dir, backend, open_here and registry


# --- tenants ----------------------------------------------------------------------------


def test_tenants_are_created_listed_in_name_order_and_get_quotas(open_here):
    reg = open_here(default_quotas=Quotas(max_adapters=5))
    for name in ("zeta", "alpha", "mid"):
        reg.create_tenant(name)
    root = reg.create_tenant("root", admin=True, quotas=Quotas(max_concurrent_jobs=2))
    assert root.admin and root.quotas == Quotas(max_concurrent_jobs=2)
    assert reg.get_tenant("alpha").quotas == Quotas(max_adapters=5)  # the registry's default
    assert [t.name for t in reg.list_tenants()] == ["alpha", "mid", "root", "zeta"]
    assert [t.name for t in reg.list_tenants(after="mid", limit=1)] == ["root"]
    changed = reg.set_quotas("alpha", Quotas(max_versions_per_adapter=3))
    assert changed.quotas == reg.get_tenant("alpha").quotas == Quotas(max_versions_per_adapter=3)
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        reg.set_quotas("nobody", Quotas())
    with pytest.raises(ValueError, match="max_adapters=-1"):
        reg.set_quotas("alpha", Quotas(max_adapters=-1))
    reg.close()


def test_a_registry_of_revision_0007_gets_max_sessions_in_every_tenants_quotas(open_here):
    reg = open_here()
    reg.create_tenant("limited", quotas=Quotas(max_adapters=5, max_sessions=9))
    reg.create_tenant("unlimited")
    reg.create_tenant("chosen", quotas=Quotas(max_adapters=5, max_sessions=2))
    with reg._transaction(write=True) as db:  # back to how revision 0007 stored quotas
        for name in ("limited", "unlimited"):
            quotas = json.loads(db.execute("SELECT quotas FROM tenants WHERE name = ?",
                                           (name,)).fetchone()[0])
            del quotas["max_sessions"]
            db.execute("UPDATE tenants SET quotas = ? WHERE name = ?", (json.dumps(quotas), name))
        db.execute("UPDATE alembic_version SET version_num = '0007'")
    reg.close()
    reg = open_here()
    assert reg.get_tenant("limited").quotas == Quotas(max_adapters=5, max_sessions=4)
    assert reg.get_tenant("unlimited").quotas == Quotas()  # no limit at all: none here either
    assert reg.get_tenant("chosen").quotas.max_sessions == 2  # set already: kept
    reg.close()


def test_max_sessions_is_set_and_read_back_with_the_other_quotas(registry):
    registry.set_quotas("acme", Quotas(max_sessions=3, max_concurrent_jobs=1))
    assert registry.get_tenant("acme").quotas == Quotas(max_sessions=3, max_concurrent_jobs=1)
    with pytest.raises(ValueError, match="max_sessions=-1"):
        registry.set_quotas("acme", Quotas(max_sessions=-1))


def test_duplicate_tenant_is_refused(registry):
    with pytest.raises(AlreadyExists, match="tenant 'acme' already exists"):
        registry.create_tenant("acme")


@pytest.mark.parametrize("name", ["../x", "", "a" * 129, "é", "a/b", ".hidden", "-x", "a b",
                                  "abc\n", "x\x00"])
def test_invalid_names_are_refused_with_what_is_accepted(registry, files, name):
    for call in (lambda: registry.create_tenant(name),
                 lambda: registry.publish_version("acme", name, files, UPLOAD),
                 lambda: registry.create_job("acme", name, {})):
        with pytest.raises(InvalidName, match="accepted: 1-128 letters, digits"):
            call()
    assert registry.list_adapters("acme") == []
    registry.create_tenant("a" * 128)  # the longest accepted name


def test_unknown_tenant_is_not_found_everywhere(registry, files, data_dir):
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        registry.get_tenant("nobody")
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        registry.issue_token("nobody")
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        registry.publish_version("nobody", "foo", files, UPLOAD)
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        registry.create_job("nobody", "foo", {})
    assert blob_dirs(data_dir) == set()  # the refused publish's blob is gone


def test_tenants_see_nothing_of_each_other(registry, files):
    registry.publish_version("acme", "foo", files, UPLOAD)
    job = registry.create_job("acme", "foo", {"steps": 1})
    assert registry.list_adapters("globex") == []
    assert registry.list_jobs("globex") == []
    for call in (lambda: registry.get_adapter("globex", "foo"),
                 lambda: registry.get_version("globex", "foo"),
                 lambda: registry.get_version("globex", "foo", 1),
                 lambda: registry.list_versions("globex", "foo"),
                 lambda: registry.delete_adapter("globex", "foo"),
                 lambda: registry.delete_adapter("globex", "foo", 1)):
        with pytest.raises(NotFound, match="^adapter 'foo' not found$"):
            call()
    with pytest.raises(NotFound, match=f"^job '{job.id}' not found$"):
        registry.get_job("globex", job.id)
    with pytest.raises(NotFound):
        registry.list_jobs("globex", after=job.id)
    assert registry.version_dir(registry.get_version("acme", "foo", 1)).exists()  # untouched
    # the same name is a different adapter in another tenant, with its own versions
    assert registry.publish_version("globex", "foo", files, UPLOAD).version == 1


def test_an_admin_lists_and_finds_every_tenants_jobs_where_tenants_find_only_their_own(
        registry):
    acme = registry.create_job("acme", "foo", {})
    globex = registry.create_job("globex", "bar", {})
    assert [j.id for j in registry.list_jobs(None)] == [globex.id, acme.id]
    assert [j.id for j in registry.list_jobs(None, after=globex.id)] == [acme.id]
    assert [j.id for j in registry.list_jobs("acme")] == [acme.id]
    assert registry.get_job(None, globex.id).tenant == "globex"
    with pytest.raises(NotFound):
        registry.get_job("acme", globex.id)


def test_deleting_a_tenant_removes_its_tokens_adapters_and_jobs_and_nothing_of_others(
        registry, files, data_dir):
    _, secret = registry.issue_token("acme")
    _, kept_secret = registry.issue_token("globex")
    registry.publish_version("acme", "foo", files, UPLOAD)
    registry.publish_version("acme", "foo", files, UPLOAD)
    registry.publish_version("globex", "foo", files, UPLOAD)
    running = registry.create_job("acme", "foo", {})
    registry.update_job(running.id, state="running")
    other = registry.create_job("globex", "foo", {})
    deletion = registry.delete_tenant("acme")
    assert (deletion.adapters, deletion.versions, deletion.tokens) == (1, 2, 1)
    assert [(j.id, j.state) for j in deletion.jobs] == [(running.id, "running")]
    assert registry.authenticate(secret) is None
    assert len(blob_dirs(data_dir)) == 1  # globex's version
    for call in (lambda: registry.get_tenant("acme"), lambda: registry.tokens("acme"),
                 lambda: registry.issue_token("acme"), lambda: registry.delete_tenant("acme"),
                 lambda: registry.create_job("acme", "foo", {}),
                 lambda: registry.publish_version("acme", "foo", files, UPLOAD)):
        with pytest.raises(NotFound, match="tenant 'acme' not found"):
            call()
    with pytest.raises(NotFound):
        registry.get_job(None, running.id)
    assert [t.name for t in registry.list_tenants()] == ["globex"]
    assert registry.authenticate(kept_secret).name == "globex"
    assert [j.id for j in registry.list_jobs(None)] == [other.id]
    assert registry.get_version("globex", "foo").version == 1


def test_a_tenant_created_again_starts_empty_and_never_reuses_a_version_number(registry, files):
    registry.publish_version("acme", "foo", files, UPLOAD)
    registry.publish_version("acme", "foo", files, UPLOAD)
    registry.delete_tenant("acme")
    again = registry.create_tenant("acme", quotas=Quotas(max_adapters=3))
    assert again.quotas == registry.get_tenant("acme").quotas == Quotas(max_adapters=3)
    assert registry.list_adapters("acme") == [] and registry.tokens("acme") == []
    # the runtime caches weights by tenant/name@version: v1 would be the old tenant's
    assert registry.publish_version("acme", "foo", files, UPLOAD).version == 3
    with pytest.raises(AlreadyExists):
        registry.create_tenant("acme")


def test_an_admin_tenant_cannot_be_deleted(registry):
    registry.create_tenant("root", admin=True)
    with pytest.raises(FailedPrecondition, match="tenant 'root' is an admin tenant, and admin "
                                                 "tenants cannot be deleted"):
        registry.delete_tenant("root")
    assert registry.get_tenant("root").admin


# --- tokens -----------------------------------------------------------------------------


def test_token_authenticates_its_tenant_until_revoked(registry):
    record, secret = registry.issue_token("acme", description="ci")
    assert record.tenant == "acme" and record.description == "ci" and not record.revoked
    assert secret.startswith(f"ct_{record.id}_") and len(record.id) == 12
    assert registry.authenticate(secret).name == "acme"
    second, _ = registry.issue_token("acme")
    assert [t.id for t in registry.tokens("acme")] == [record.id, second.id]
    assert registry.tokens("globex") == []
    assert registry.revoke_token(record.id) is True
    assert registry.revoke_token(record.id) is False  # already revoked
    with pytest.raises(NotFound, match="token id '000000000000' not found"):
        registry.revoke_token("000000000000")
    assert registry.authenticate(secret) is None
    assert [t.revoked for t in registry.tokens("acme")] == [True, False]


def test_malformed_or_wrong_tokens_are_none_never_an_exception(registry):
    record, secret = registry.issue_token("acme")
    body = secret.removeprefix(f"ct_{record.id}_")
    wrong_secret = ("A" if body[0] != "A" else "B") + body[1:]
    shapes = [
        "", "ct_", "ct__", f"ct_{record.id}", f"ct_{record.id}_", f"ct_{record.id}_{wrong_secret}",
        f"ct_{record.id}_{body}x", f"ct_{record.id}_{body[:-1]}", f"ct_{record.id.upper()}_{body}",
        f"xx_{record.id}_{body}", f"CT_{record.id}_{body}", f" {secret}", f"{secret}\n",
        f"ct_{record.id}_{body[:-1]}é", f"ct_{record.id[:-1]}é_{body}", secret.replace("_", "-"),
        f"ct_{'0' * 12}_{body}", f"ct_{record.id}_{body}_{body}", "Bearer " + secret,
        "ct_" + "\x00" * 12 + "_" + body, "\udcff", None, b"ct_x", 42,
    ]
    for token in shapes:
        assert registry.authenticate(token) is None, token
    assert registry.authenticate(secret).name == "acme"


@pytest.mark.parametrize("backend", ["sqlite"])  # the file's bytes
def test_database_does_not_hold_token_secrets(registry, data_dir):
    record, secret = registry.issue_token("acme")
    body = secret.removeprefix(f"ct_{record.id}_").encode()  # the body may hold "_" itself
    stored = b"".join(p.read_bytes() for p in data_dir.glob("registry.sqlite3*"))
    assert record.id.encode() in stored  # the test reads the right files
    assert body not in stored and body[:16] not in stored


def test_a_preset_token_authenticates_and_a_malformed_one_is_refused(open_here):
    registry = open_here()
    registry.create_tenant("ops", admin=True)
    preset = "ct_0123456789ab_" + "A" * 43
    record, token = registry.issue_token("ops", "from a Kubernetes Secret", preset)
    assert token == preset and record.id == "0123456789ab"
    assert registry.authenticate(preset).name == "ops"
    with pytest.raises(ValueError, match="ct_<12 hex digits>"):
        registry.issue_token("ops", "", "ct_short_secret")
    with pytest.raises(AlreadyExists):
        registry.issue_token("ops", "", preset)
    registry.close()


def test_workers_exchange_the_tokens_their_tenants_used_in_the_last_minute(registry):
    assert registry.exchange_token_usage("w1", {"acme": 100}, now=1000.0) == {}
    assert registry.exchange_token_usage("w2", {"acme": 50, "globex": 7}, now=1001.0) == \
        {"acme": 100}
    assert registry.exchange_token_usage("w1", {"acme": 120}, now=1002.0) == \
        {"acme": 50, "globex": 7}  # its own report replaced, never counted
    assert registry.exchange_token_usage("w3", {}, now=1003.0) == {"acme": 170, "globex": 7}
    # a worker that stopped reporting counts no more a minute after its last report
    assert registry.exchange_token_usage("w3", {}, now=1061.5) == {"acme": 120}
    registry.delete_tenant("acme")
    assert registry.exchange_token_usage("w3", {}, now=1062.0) == {}
