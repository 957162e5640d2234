"""The registry's adapters and versions: numbering, files and provenance, listing, deletes,
quotas, the blob store, the schema's migrations, and what survives a reopen or a crash; real
files in tmp_path, on both backends (real SQLite and a real PostgreSQL server)."""

from __future__ import annotations

import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from registry_helpers import UPLOAD, blob_dirs, sha256, write_adapter

from cotune.adapters.blob_store import CONFIG_NAME, WEIGHTS_NAME, LocalBlobStore
from cotune.adapters.registry import NotFound, QuotaExceeded, Quotas, RegistryError
from cotune.adapters.schema_migrations import newest_revision
from cotune.adapters.sql_registry import SqliteRegistry

pytest_plugins = ["registry_fixtures"]  # files, data_dir, backend, open_here and registry


# --- adapters and versions --------------------------------------------------------------


def test_versions_count_from_one_and_keep_their_files_and_provenance(registry, tmp_path):
    published = []
    for seed in (1, 2, 3):
        provenance = {"source": "job", "parent_version": seed - 1, "job_id": "job-1",
                      "hyperparameters": {"lr": 1e-4, "steps": 10}, "metrics": {"loss": 0.5}}
        src = write_adapter(tmp_path / f"v{seed}", seed=seed)
        published.append(registry.publish_version("acme", "foo", src, provenance))
        version = published[-1]
        assert version.version == seed and version.provenance == provenance
        assert (version.rank, version.alpha, version.target_modules) == (4, 8.0, ("q_proj",))
        stored = registry.version_dir(version) / WEIGHTS_NAME
        assert version.sha256 == sha256(src / WEIGHTS_NAME) == sha256(stored)
        assert version.size_bytes == sum((src / f).stat().st_size
                                         for f in (CONFIG_NAME, WEIGHTS_NAME))
    assert registry.get_version("acme", "foo") == published[-1]  # newest
    assert registry.get_version("acme", "foo", 2) == published[1]
    assert registry.list_versions("acme", "foo") == published
    assert [v.version for v in registry.list_versions("acme", "foo", after=1, limit=1)] == [2]
    adapter = registry.get_adapter("acme", "foo")
    assert (adapter.latest_version, adapter.version_count) == (3, 3)


def test_config_defaults_and_regex_target_modules_are_recorded(registry, files, tmp_path):
    src = tmp_path / "regex"
    src.mkdir()
    (src / WEIGHTS_NAME).write_bytes((files / WEIGHTS_NAME).read_bytes())
    (src / "README.md").write_text("not copied")
    (src / CONFIG_NAME).write_text(json.dumps(
        {"peft_type": "LORA", "target_modules": r".*\.(q|v)_proj"}))  # r, lora_alpha absent
    version = registry.publish_version("acme", "regex", src, UPLOAD)
    assert (version.rank, version.alpha) == (8, 8.0)  # PEFT's defaults
    assert version.target_modules == (r".*\.(q|v)_proj",)
    stored = registry.version_dir(version)
    assert sorted(p.name for p in stored.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_versions_are_never_reused_after_deletes(registry, files, data_dir):
    for _ in range(3):
        registry.publish_version("acme", "foo", files, UPLOAD)
    v3 = registry.get_version("acme", "foo", 3)
    assert registry.delete_adapter("acme", "foo", 3) == 1
    assert not registry.version_dir(v3).exists()
    assert registry.publish_version("acme", "foo", files, UPLOAD).version == 4
    assert registry.delete_adapter("acme", "foo") == 3  # versions 1, 2 and 4
    assert blob_dirs(data_dir) == set()
    assert registry.publish_version("acme", "foo", files, UPLOAD).version == 5  # even now


def test_deleting_the_last_version_deletes_the_adapter(registry, files):
    registry.publish_version("acme", "foo", files, UPLOAD)
    registry.publish_version("acme", "foo", files, UPLOAD)
    registry.delete_adapter("acme", "foo", 1)
    assert registry.get_adapter("acme", "foo").version_count == 1
    registry.delete_adapter("acme", "foo", 2)
    with pytest.raises(NotFound, match="adapter 'foo' not found"):
        registry.get_adapter("acme", "foo")
    assert registry.list_adapters("acme") == []


def test_not_found_names_what_the_caller_asked_for(registry, files):
    registry.publish_version("acme", "foo", files, UPLOAD)
    with pytest.raises(NotFound, match="^version 3 of adapter 'foo' not found$"):
        registry.get_version("acme", "foo", 3)
    with pytest.raises(NotFound, match="^version 3 of adapter 'foo' not found$"):
        registry.delete_adapter("acme", "foo", 3)
    with pytest.raises(NotFound, match="^adapter 'bar' not found$"):
        registry.get_version("acme", "bar", 1)
    with pytest.raises(NotFound, match="^adapter 'bar' not found$"):
        registry.list_versions("acme", "bar")
    with pytest.raises(NotFound, match="^job 'job-0' not found$"):
        registry.get_job("acme", "job-0")


def test_description_and_labels_replace_the_adapters_only_when_given(registry, files):
    registry.publish_version("acme", "foo", files, UPLOAD, description="first",
                             labels={"team": "nlp"})
    registry.publish_version("acme", "foo", files, UPLOAD)
    adapter = registry.get_adapter("acme", "foo")
    assert (adapter.description, adapter.labels) == ("first", {"team": "nlp"})
    registry.publish_version("acme", "foo", files, UPLOAD, description="", labels={})
    adapter = registry.get_adapter("acme", "foo")
    assert (adapter.description, adapter.labels) == ("", {})
    assert adapter.updated >= adapter.created


def test_list_adapters_pages_by_name_with_prefix_and_label_filters(registry, files):
    for name, labels in [("chat-b", {"team": "nlp", "env": "prod"}), ("chat_a", {"team": "nlp"}),
                         ("chatXa", {"team": "nlp"}), ("code", {"team": "dev", "env": "prod"}),
                         ("chat-c", {"env": "prod"})]:
        registry.publish_version("acme", name, files, UPLOAD, labels=labels)
    names = [a.name for a in registry.list_adapters("acme")]
    assert names == sorted(names) == ["chat-b", "chat-c", "chatXa", "chat_a", "code"]
    assert [a.name for a in registry.list_adapters("acme", after="chat-c", limit=2)] == \
        ["chatXa", "chat_a"]
    # '_' is a name character here, not a wildcard
    assert [a.name for a in registry.list_adapters("acme", name_prefix="chat_")] == ["chat_a"]
    assert [a.name for a in registry.list_adapters("acme", name_prefix="chat-")] == \
        ["chat-b", "chat-c"]
    assert [a.name for a in registry.list_adapters("acme", labels={"env": "prod"})] == \
        ["chat-b", "chat-c", "code"]
    assert [a.name for a in registry.list_adapters(
        "acme", name_prefix="c", labels={"env": "prod", "team": "nlp"})] == ["chat-b"]
    assert registry.list_adapters("acme", labels={"env": "dev"}) == []
    with pytest.raises(ValueError, match="limit 0"):
        registry.list_adapters("acme", limit=0)


def test_concurrent_publishes_get_distinct_consecutive_versions(registry, files):
    start = threading.Barrier(8)

    def publish_five(_):
        start.wait()
        return [registry.publish_version("acme", "foo", files, UPLOAD).version for _ in range(5)]

    with ThreadPoolExecutor(8) as pool:
        versions = [v for batch in pool.map(publish_five, range(8)) for v in batch]
    assert sorted(versions) == list(range(1, 41))
    assert [v.version for v in registry.list_versions("acme", "foo")] == list(range(1, 41))
    assert len({v.blob_id for v in registry.list_versions("acme", "foo")}) == 40


# --- quotas -----------------------------------------------------------------------------


def test_max_adapters_refuses_a_new_adapter_but_not_a_new_version(registry, files, data_dir):
    registry.set_quotas("acme", Quotas(max_adapters=2))
    registry.publish_version("acme", "a", files, UPLOAD)
    registry.publish_version("acme", "b", files, UPLOAD)
    with pytest.raises(QuotaExceeded, match="tenant 'acme' has 2 adapters.*quota is 2") as info:
        registry.publish_version("acme", "c", files, UPLOAD)
    assert info.value.limit == "max_adapters"
    assert registry.publish_version("acme", "a", files, UPLOAD).version == 2
    assert len(blob_dirs(data_dir)) == 3  # the refused version's blob was removed
    registry.publish_version("globex", "c", files, UPLOAD)  # another tenant's quota


def test_max_versions_per_adapter_counts_existing_versions(registry, files):
    registry.set_quotas("acme", Quotas(max_versions_per_adapter=2))
    registry.publish_version("acme", "a", files, UPLOAD)
    registry.publish_version("acme", "a", files, UPLOAD)
    with pytest.raises(QuotaExceeded, match="adapter 'a' has 2 versions.*quota is 2") as info:
        registry.publish_version("acme", "a", files, UPLOAD)
    assert info.value.limit == "max_versions_per_adapter"
    registry.delete_adapter("acme", "a", 1)
    assert registry.publish_version("acme", "a", files, UPLOAD).version == 3


# --- durability and crashes -------------------------------------------------------------


def test_reopening_keeps_everything(open_here, files):
    reg = open_here()
    reg.create_tenant("acme", quotas=Quotas(max_adapters=3))
    _, secret = reg.issue_token("acme")
    version = reg.publish_version("acme", "foo", files, UPLOAD, labels={"k": "v"})
    job = reg.update_job(reg.create_job("acme", "foo", {"steps": 2}).id, state="running")
    reg.close()
    reg = open_here()
    assert reg.get_tenant("acme").quotas == Quotas(max_adapters=3)
    assert reg.authenticate(secret).name == "acme"
    assert reg.get_version("acme", "foo") == version and reg.version_dir(version).exists()
    assert reg.get_adapter("acme", "foo").labels == {"k": "v"}
    assert reg.unfinished_jobs() == [job]
    assert reg.publish_version("acme", "foo", files, UPLOAD).version == 2
    reg.close()


def test_the_sqlite_file_runs_in_wal_mode(data_dir):
    SqliteRegistry(data_dir).close()
    mode = sqlite3.connect(data_dir / "registry.sqlite3").execute("PRAGMA journal_mode")
    assert mode.fetchone()[0] == "wal"


def test_open_sweeps_unreferenced_blobs_and_staging_debris(open_here, data_dir, files):
    reg = open_here()
    reg.create_tenant("acme")
    kept = reg.publish_version("acme", "foo", files, UPLOAD)
    deleted = reg.publish_version("acme", "foo", files, UPLOAD)
    reg.close()
    blobs = LocalBlobStore(data_dir / "blobs")
    renamed = blobs.directory(blobs.publish(files))  # a crash between the rename and the insert
    debris = data_dir / "blobs" / ".staging" / "tmpcrash"  # a crash while copying
    debris.mkdir()
    (debris / WEIGHTS_NAME).write_bytes(b"half")
    reg = open_here()
    with reg._transaction(write=True) as db:  # a crash after a delete commits
        db.execute("DELETE FROM versions WHERE version = 2")
    reg.close()
    reg = open_here()
    assert not renamed.exists() and not debris.exists() and not reg.version_dir(deleted).exists()
    assert blob_dirs(data_dir) == {reg.version_dir(kept)}
    assert sha256(reg.version_dir(kept) / WEIGHTS_NAME) == kept.sha256
    reg.close()


def test_a_second_open_of_the_same_directory_does_not_sweep(open_here, data_dir, files):
    """An admin command beside a running server must not remove a blob the server has
    published and is about to insert."""
    server = open_here()
    blobs = LocalBlobStore(data_dir / "blobs")
    in_flight = blobs.directory(blobs.publish(files))
    open_here().close()
    assert in_flight.exists()
    server.close()
    open_here().close()  # alone now: the orphan goes
    assert not in_flight.exists()


def test_a_registry_migrated_by_a_newer_cotune_is_refused(open_here):
    registry = open_here()
    with registry._transaction(write=True) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    registry.close()
    with pytest.raises(RegistryError, match=(
            r"the registry .* has a schema this cotune does not know \(.*'9999'.*\); its "
            rf"newest is revision {newest_revision()}; accepted: a registry written by this")):
        open_here()


# --- the blob store ---------------------------------------------------------------------


def test_blob_store_refuses_ids_that_are_not_hex_and_incomplete_adapters(tmp_path, files):
    blobs = LocalBlobStore(tmp_path / "blobs")
    for bad in ("..", "../x", "", "A" * 32, "0" * 31, "g" * 32, "0" * 32 + "/x", None):
        with pytest.raises(ValueError, match="accepted: 32 lowercase hex digits"):
            blobs.directory(bad)
        with pytest.raises(ValueError):
            blobs.remove(bad)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / CONFIG_NAME).write_text((files / CONFIG_NAME).read_text())
    with pytest.raises(FileNotFoundError, match=f"has no {WEIGHTS_NAME}; accepted"):
        blobs.publish(partial)
    assert list((tmp_path / "blobs").iterdir()) == [tmp_path / "blobs" / ".staging"]
    assert list((tmp_path / "blobs" / ".staging").iterdir()) == []
