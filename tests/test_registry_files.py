"""The registry's uploaded files and stored job events: tenancy, the per-tenant bound, paging,
what a deleted tenant leaves (nothing), the sweep of what a crash left, on both backends; and
SQLite's schema 3 -> 4 migration keeping the data."""

from __future__ import annotations

import sqlite3

import pytest
from registry_helpers import legacy_registry

from cotune.adapters.migrations import MANAGED_BY_ALEMBIC
from cotune.adapters.registry import NotFound, QuotaExceeded
from cotune.adapters.schema_migrations import newest_revision
from cotune.adapters.sql_registry import SqliteRegistry

pytest_plugins = ["registry_fixtures"]  # files, data_dir, backend, open_here and registry


def staged(tmp_path, data: bytes = b'{"text": "hello there"}\n', name: str = "upload"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def stored(data_dir) -> list[str]:
    return sorted(p.name for p in (data_dir / "files").iterdir())


def test_a_file_is_moved_into_the_store_and_found_by_its_tenant_only(registry, tmp_path,
                                                                     data_dir):
    source = staged(tmp_path, b'{"text": "a b c"}\n')
    record = registry.add_file("acme", "train.jsonl", "fine-tune", source)
    assert record.id.startswith("file-") and len(record.id) == 29
    assert (record.filename, record.purpose, record.size_bytes) == ("train.jsonl", "fine-tune",
                                                                    18)
    with registry.open_file(record) as content:
        assert not source.exists() and content.read() == b'{"text": "a b c"}\n'
    assert registry.get_file("acme", record.id) == record
    for tenant, file_id in (("globex", record.id), ("acme", "file-" + "0" * 24),
                            ("acme", "../registry.sqlite3")):
        with pytest.raises(NotFound, match="not found"):
            registry.get_file(tenant, file_id)
        with pytest.raises(NotFound):
            registry.delete_file(tenant, file_id)
    assert stored(data_dir) == [record.id]


def test_files_list_newest_first_by_purpose_and_page_after_an_id(registry, tmp_path):
    ids = [registry.add_file("acme", f"{i}.jsonl", "fine-tune", staged(tmp_path)).id
           for i in range(3)]
    registry.add_file("globex", "x.jsonl", "fine-tune", staged(tmp_path))
    assert [f.id for f in registry.list_files("acme")] == ids[::-1]
    assert [f.id for f in registry.list_files("acme", after=ids[2], limit=1)] == [ids[1]]
    assert registry.list_files("acme", purpose="batch") == []
    with pytest.raises(NotFound, match="accepted as `after`"):
        registry.list_files("globex", after=ids[0])


def test_max_files_refuses_past_the_bound_and_leaves_no_bytes(registry, tmp_path, data_dir):
    first = registry.add_file("acme", "a.jsonl", "fine-tune", staged(tmp_path), max_files=1)
    with pytest.raises(QuotaExceeded, match="has 1 files.*--max-files-per-tenant") as info:
        registry.add_file("acme", "b.jsonl", "fine-tune", staged(tmp_path), max_files=1)
    assert info.value.limit == "max_files"
    assert stored(data_dir) == [first.id]
    registry.delete_file("acme", first.id)
    assert stored(data_dir) == []
    registry.add_file("acme", "b.jsonl", "fine-tune", staged(tmp_path), max_files=1)


def test_job_events_record_every_state_change_with_its_error_and_page_newest_first(registry):
    job = registry.create_job("acme", "foo", {})
    registry.update_job(job.id, state="running")
    registry.update_job(job.id, state="running", progress={"step": 1})  # no change: no event
    registry.add_job_event(job.id, "progress", {"step": 1, "loss": 2.0}, 5.0)
    registry.update_job(job.id, state="failed", error="out of memory")
    events = registry.list_job_events("acme", job.id)
    assert [(e.sequence, e.kind, e.data) for e in events] == [
        (5, "error", {"error": "out of memory"}), (4, "state", {"state": "failed"}),
        (3, "progress", {"step": 1, "loss": 2.0}), (2, "state", {"state": "running"}),
        (1, "state", {"state": "queued"})]
    assert [e.sequence for e in registry.list_job_events("acme", job.id, before=4,
                                                         limit=2)] == [3, 2]
    with pytest.raises(NotFound):
        registry.list_job_events("globex", job.id)
    assert registry.list_job_events(None, job.id) == events  # an admin's: any tenant's job
    with pytest.raises(NotFound):
        registry.add_job_event("job-gone", "progress", {}, 1.0)
    with pytest.raises(ValueError, match="kind 'chat' is invalid"):
        registry.add_job_event(job.id, "chat", {}, 1.0)


def test_deleting_a_tenant_removes_its_files_and_job_events_only(registry, tmp_path, data_dir):
    mine = registry.add_file("acme", "a.jsonl", "fine-tune", staged(tmp_path))
    theirs = registry.add_file("globex", "b.jsonl", "fine-tune", staged(tmp_path))
    job = registry.create_job("acme", "foo", {}, training_file=mine.id)
    other = registry.create_job("globex", "foo", {})
    assert registry.get_job("acme", job.id).training_file == mine.id
    assert registry.delete_tenant("acme").files == 1
    assert stored(data_dir) == [theirs.id]
    with registry._transaction() as db:
        assert [row[0] for row in db.execute("SELECT DISTINCT job_id FROM job_events")] == \
            [other.id]
    registry.create_tenant("acme")  # the name again: nothing of the old tenant's
    assert registry.list_files("acme") == []


def test_open_sweeps_files_that_no_row_references(open_here, data_dir, tmp_path):
    registry = open_here()
    registry.create_tenant("acme")
    kept = registry.add_file("acme", "a.jsonl", "fine-tune", staged(tmp_path))
    registry.close()
    debris = data_dir / "files" / ("file-" + "1" * 24)  # a crash between the bytes and the row
    debris.write_bytes(b"{}")
    open_here().close()
    assert stored(data_dir) == [kept.id]


def test_a_schema_3_registry_gets_files_and_job_events_and_keeps_its_jobs(data_dir):
    job_id = "job-0123456789abcdef"
    with legacy_registry(data_dir) as db:  # as cotune with schema 3 left it
        db.executescript(
            "DROP TABLE job_events; DROP TABLE files; DROP TABLE jobs; "
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES "
            "tenants(name), adapter TEXT NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL, "
            "error TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, versions TEXT "
            "NOT NULL, progress TEXT NOT NULL, owner TEXT NOT NULL DEFAULT ''); "
            "PRAGMA user_version = 3; "
            "INSERT INTO tenants VALUES ('acme', 0, '{}', 1.0, 0); "
            f"INSERT INTO jobs VALUES ('{job_id}', 'acme', 'foo', 'succeeded', "
            "'{\"epochs\": 2}', '', 1.0, 2.0, '[1]', '{}', 'worker-0');")
    registry = SqliteRegistry(data_dir)
    kept = registry.get_job("acme", job_id)
    assert (kept.state, kept.spec, kept.versions, kept.training_file) == \
        ("succeeded", {"epochs": 2}, (1,), "")
    assert registry.list_job_events("acme", job_id) == []  # none were stored before schema 4
    registry.add_job_event(job_id, "progress", {"step": 1}, 1.0)
    assert registry.list_files("acme") == []
    registry.close()
    with sqlite3.connect(data_dir / "registry.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == MANAGED_BY_ALEMBIC
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == \
            newest_revision()
