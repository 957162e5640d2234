"""The SQLite registry keeps tenants, tokens, adapter versions and jobs, isolates tenants,
enforces quotas, and survives crashes: real files, real SQLite and real processes in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cotune.adapters.blob_store import CONFIG_NAME, WEIGHTS_NAME, BlobStore
from cotune.adapters.peft_format import LoraAdapter, LoraModule, save_peft_adapter
from cotune.adapters.registry import (
    AlreadyExists,
    InvalidName,
    NotFound,
    QuotaExceeded,
    Quotas,
    RegistryError,
)
from cotune.adapters.sqlite_registry import SqliteRegistry

Q0 = "model.layers.0.self_attn.q_proj"
UPLOAD = {"source": "upload", "base_fingerprint": "sha256:base"}


def write_adapter(path: Path, seed: int = 0, rank: int = 4, features: int = 16) -> Path:
    """A real PEFT LoRA adapter of one q_proj, as cotune's save_peft_adapter writes it."""
    g = torch.Generator().manual_seed(seed)
    module = LoraModule(a=torch.randn(rank, features, generator=g),
                        b=torch.randn(features, rank, generator=g), scale=8 / rank)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"]}
    save_peft_adapter(LoraAdapter(modules={Q0: module}, config=config), path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blob_dirs(data_dir: Path) -> set[Path]:
    return {p for p in (data_dir / "blobs").iterdir() if p.name != ".staging"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def registry(data_dir):
    reg = SqliteRegistry(data_dir)
    reg.create_tenant("acme")
    reg.create_tenant("globex")
    yield reg
    reg.close()


# --- tenants ----------------------------------------------------------------------------


def test_tenants_are_created_listed_in_name_order_and_get_quotas(data_dir):
    reg = SqliteRegistry(data_dir, default_quotas=Quotas(max_adapters=5))
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
    assert registry.revoke_token("000000000000") is False
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


def test_database_does_not_hold_token_secrets(registry, data_dir):
    record, secret = registry.issue_token("acme")
    body = secret.rsplit("_", 1)[-1].encode()
    stored = b"".join(p.read_bytes() for p in data_dir.glob("registry.sqlite3*"))
    assert record.id.encode() in stored  # the test reads the right files
    assert body not in stored and body[:16] not in stored


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
        assert version.sha256 == sha256(src / WEIGHTS_NAME) == sha256(version.path / WEIGHTS_NAME)
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
    assert sorted(p.name for p in version.path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_versions_are_never_reused_after_deletes(registry, files, data_dir):
    for _ in range(3):
        registry.publish_version("acme", "foo", files, UPLOAD)
    v3 = registry.get_version("acme", "foo", 3)
    assert registry.delete_adapter("acme", "foo", 3) == 1
    assert not v3.path.exists()
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
    assert registry.get_version("acme", "foo", 1).path.exists()  # untouched
    # the same name is a different adapter in another tenant, with its own versions
    assert registry.publish_version("globex", "foo", files, UPLOAD).version == 1


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


def test_max_concurrent_jobs_counts_queued_and_running(registry):
    registry.set_quotas("acme", Quotas(max_concurrent_jobs=2))
    first = registry.create_job("acme", "foo", {})
    second = registry.create_job("acme", "foo", {})
    registry.update_job(second.id, state="running")
    with pytest.raises(QuotaExceeded, match="2 jobs queued or running.*quota is 2") as info:
        registry.create_job("acme", "foo", {})
    assert info.value.limit == "max_concurrent_jobs"
    registry.update_job(first.id, state="succeeded")
    registry.create_job("acme", "foo", {})
    registry.create_job("globex", "foo", {})  # another tenant's quota


# --- jobs -------------------------------------------------------------------------------


def test_jobs_record_states_versions_and_progress(registry):
    spec = {"base": "smollm2", "lora": {"rank": 8}, "steps": 100}
    job = registry.create_job("acme", "foo", spec)
    assert job.id.startswith("job-") and len(job.id) == 20
    assert (job.state, job.spec, job.versions, job.progress) == ("queued", spec, (), {})
    assert registry.get_job("acme", job.id) == job
    registry.update_job(job.id, state="running", progress={"step": 1, "loss": 2.5})
    registry.update_job(job.id, version=1, progress={"step": 50, "loss": 1.5})
    done = registry.update_job(job.id, state="failed", error="out of memory", version=2)
    assert done == registry.get_job("acme", job.id)
    assert (done.state, done.error, done.versions) == ("failed", "out of memory", (1, 2))
    assert done.progress == {"step": 50, "loss": 1.5}  # the latest replaces the previous
    with pytest.raises(ValueError, match="job state 'done' is invalid; accepted: queued"):
        registry.update_job(job.id, state="done")
    with pytest.raises(NotFound, match="job 'job-nope' not found"):
        registry.update_job("job-nope", state="running")


def test_jobs_list_newest_first_and_unfinished_oldest_first(registry, monkeypatch):
    clock = iter(range(1_000, 2_000))
    monkeypatch.setattr(time, "time", lambda: float(next(clock)))
    jobs = [registry.create_job(tenant, "foo", {}) for tenant in ("acme", "globex") * 3]
    acme = [j.id for j in jobs if j.tenant == "acme"]
    registry.update_job(acme[0], state="succeeded")
    assert [j.id for j in registry.list_jobs("acme")] == acme[::-1]
    assert [j.id for j in registry.list_jobs("acme", after=acme[2], limit=1)] == [acme[1]]
    assert [j.id for j in registry.list_jobs("acme", state="succeeded")] == [acme[0]]
    assert [j.id for j in registry.unfinished_jobs()] == [j.id for j in jobs[1:]]
    with pytest.raises(ValueError, match="accepted: queued, running"):
        registry.list_jobs("acme", state="paused")


# --- durability and crashes -------------------------------------------------------------


def test_reopening_keeps_everything(data_dir, files):
    reg = SqliteRegistry(data_dir)
    reg.create_tenant("acme", quotas=Quotas(max_adapters=3))
    _, secret = reg.issue_token("acme")
    version = reg.publish_version("acme", "foo", files, UPLOAD, labels={"k": "v"})
    job = reg.update_job(reg.create_job("acme", "foo", {"steps": 2}).id, state="running")
    reg.close()
    reg = SqliteRegistry(data_dir)
    assert reg.get_tenant("acme").quotas == Quotas(max_adapters=3)
    assert reg.authenticate(secret).name == "acme"
    assert reg.get_version("acme", "foo") == version and version.path.exists()
    assert reg.get_adapter("acme", "foo").labels == {"k": "v"}
    assert reg.unfinished_jobs() == [job]
    assert reg.publish_version("acme", "foo", files, UPLOAD).version == 2
    mode = sqlite3.connect(data_dir / "registry.sqlite3").execute("PRAGMA journal_mode")
    assert mode.fetchone()[0] == "wal"
    reg.close()


def test_open_sweeps_unreferenced_blobs_and_staging_debris(data_dir, files):
    reg = SqliteRegistry(data_dir)
    reg.create_tenant("acme")
    kept = reg.publish_version("acme", "foo", files, UPLOAD)
    deleted = reg.publish_version("acme", "foo", files, UPLOAD)
    reg.close()
    blobs = BlobStore(data_dir / "blobs")
    _, renamed = blobs.publish(files)  # a crash between the rename and the insert
    debris = data_dir / "blobs" / ".staging" / "tmpcrash"  # a crash while copying
    debris.mkdir()
    (debris / WEIGHTS_NAME).write_bytes(b"half")
    with sqlite3.connect(data_dir / "registry.sqlite3") as db:  # a crash after a delete commits
        db.execute("DELETE FROM versions WHERE version = 2")
    reg = SqliteRegistry(data_dir)
    assert not renamed.exists() and not debris.exists() and not deleted.path.exists()
    assert blob_dirs(data_dir) == {kept.path}
    assert sha256(kept.path / WEIGHTS_NAME) == kept.sha256
    reg.close()


def test_a_second_open_of_the_same_directory_does_not_sweep(data_dir, files):
    """An admin command beside a running server must not remove a blob the server has
    published and is about to insert."""
    server = SqliteRegistry(data_dir)
    _, in_flight = BlobStore(data_dir / "blobs").publish(files)
    SqliteRegistry(data_dir).close()
    assert in_flight.exists()
    server.close()
    SqliteRegistry(data_dir).close()  # alone now: the orphan goes
    assert not in_flight.exists()


def test_newer_schema_is_refused(data_dir):
    SqliteRegistry(data_dir).close()
    with sqlite3.connect(data_dir / "registry.sqlite3") as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(RegistryError, match="schema version 99, newer than"):
        SqliteRegistry(data_dir)


_PUBLISH_FOREVER = """
import sys
from pathlib import Path
from cotune.adapters.sqlite_registry import SqliteRegistry
registry = SqliteRegistry(Path(sys.argv[1]))
sources = [Path(p) for p in sys.argv[2:]]
for i in range(10**6):
    registry.publish_version("acme", f"a{i % 2}", sources[i % len(sources)], {"source": "upload"})
    print(i, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_publishes_leaves_only_whole_versions(data_dir, tmp_path):
    sources = [write_adapter(tmp_path / f"src{i}", seed=i, rank=8, features=512)
               for i in range(3)]  # ~33 KB of weights each: the kill often lands in a copy
    setup = SqliteRegistry(data_dir)
    setup.create_tenant("acme")
    setup.close()
    child = subprocess.Popen([sys.executable, "-c", _PUBLISH_FOREVER, str(data_dir),
                              *map(str, sources)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(30):
            assert child.stdout.readline(), child.stderr.read()
        time.sleep(0.003)  # somewhere in the middle of the next publishes
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        child.kill()
        child.communicate()
    reg = SqliteRegistry(data_dir)
    versions = [v for a in reg.list_adapters("acme")
                for v in reg.list_versions("acme", a.name, limit=1000)]
    assert len(versions) >= 30
    expected = {sha256(s / WEIGHTS_NAME) for s in sources}
    for v in versions:
        assert v.sha256 in expected and sha256(v.path / WEIGHTS_NAME) == v.sha256
        assert json.loads((v.path / CONFIG_NAME).read_text())["r"] == 8
    assert blob_dirs(data_dir) == {v.path for v in versions}
    assert list((data_dir / "blobs" / ".staging").iterdir()) == []
    with sqlite3.connect(data_dir / "registry.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    latest = reg.get_adapter("acme", "a0").latest_version
    assert reg.publish_version("acme", "a0", sources[0], UPLOAD).version > latest
    reg.close()


def test_concurrent_publishes_get_distinct_consecutive_versions(registry, files):
    start = threading.Barrier(8)

    def publish_five(_):
        start.wait()
        return [registry.publish_version("acme", "foo", files, UPLOAD).version for _ in range(5)]

    with ThreadPoolExecutor(8) as pool:
        versions = [v for batch in pool.map(publish_five, range(8)) for v in batch]
    assert sorted(versions) == list(range(1, 41))
    assert [v.version for v in registry.list_versions("acme", "foo")] == list(range(1, 41))
    assert len({v.path for v in registry.list_versions("acme", "foo")}) == 40


# --- the blob store ---------------------------------------------------------------------


def test_blob_store_refuses_ids_that_are_not_hex_and_incomplete_adapters(tmp_path, files):
    blobs = BlobStore(tmp_path / "blobs")
    for bad in ("..", "../x", "", "A" * 32, "0" * 31, "g" * 32, "0" * 32 + "/x", None):
        with pytest.raises(ValueError, match="accepted: 32 lowercase hex digits"):
            blobs.path(bad)
        with pytest.raises(ValueError):
            blobs.remove(bad)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / CONFIG_NAME).write_text((files / CONFIG_NAME).read_text())
    with pytest.raises(FileNotFoundError, match=f"has no {WEIGHTS_NAME}; accepted"):
        blobs.publish(partial)
    assert list((tmp_path / "blobs").iterdir()) == [tmp_path / "blobs" / ".staging"]
    assert list((tmp_path / "blobs" / ".staging").iterdir()) == []


def test_a_preset_token_authenticates_and_a_malformed_one_is_refused(tmp_path):
    registry = SqliteRegistry(tmp_path)
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


# --- workers sharing one registry -------------------------------------------------------


def test_a_worker_resumes_its_own_jobs_and_claims_unowned_ones_once(registry):
    mine = registry.create_job("acme", "foo", {}, owner="worker-0")
    theirs = registry.create_job("acme", "foo", {}, owner="worker-1")
    unowned = registry.create_job("globex", "foo", {})
    done = registry.create_job("acme", "foo", {}, owner="worker-0")
    registry.update_job(done.id, state="succeeded")
    assert [j.id for j in registry.unfinished_jobs("worker-0")] == [mine.id, unowned.id]
    assert registry.get_job("globex", unowned.id).owner == "worker-0"
    assert [j.id for j in registry.unfinished_jobs("worker-1")] == [theirs.id]
    assert [j.id for j in registry.unfinished_jobs()] == [mine.id, theirs.id, unowned.id]


def test_a_version_1_registry_gets_job_owners_and_keeps_its_jobs(data_dir):
    reg = SqliteRegistry(data_dir)
    reg.create_tenant("acme")
    job = reg.create_job("acme", "foo", {"steps": 2}, owner="gone")
    reg.close()
    with sqlite3.connect(data_dir / "registry.sqlite3") as db:  # as cotune with schema 1 left it
        db.executescript(
            "CREATE TABLE v1 AS SELECT id, tenant, adapter, state, spec, error, created, "
            "updated, versions, progress FROM jobs; DROP TABLE jobs; "
            "ALTER TABLE v1 RENAME TO jobs; PRAGMA user_version = 1;")
    reg = SqliteRegistry(data_dir)
    assert reg.get_job("acme", job.id).owner == ""
    assert [j.id for j in reg.unfinished_jobs("worker-0")] == [job.id]
    reg.close()
    with sqlite3.connect(data_dir / "registry.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2


_WORKER = """
import json, sys, time
from pathlib import Path
from cotune.adapters.sqlite_registry import SqliteRegistry
data_dir, source, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
registry = SqliteRegistry(data_dir)
while not go.exists():
    time.sleep(0.001)
token = registry.bootstrap_admin()
while not registry.list_tenants():  # the other worker is making the admin
    time.sleep(0.01)
versions = [registry.publish_version("admin", "shared", source, {"source": "upload"}).version
            for _ in range(12)]
print(json.dumps({"token": token, "versions": versions}), flush=True)
"""


@pytest.mark.slow
def test_two_processes_share_one_registry(data_dir, tmp_path):
    """Two workers on one data_dir: one makes the admin, versions never collide, a token one
    issued authenticates in the other, and opens beside them never sweep a blob in flight."""
    sources = [write_adapter(tmp_path / f"src{i}", seed=i, rank=8, features=256)
               for i in range(2)]
    SqliteRegistry(data_dir).close()
    go = tmp_path / "go"
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(data_dir), str(source),
                                 str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for source in sources]
    try:
        go.touch()
        opens = 0
        while any(w.poll() is None for w in workers) or opens < 3:
            SqliteRegistry(data_dir).close()  # would sweep, were it alone
            opens += 1
        results = []
        for worker in workers:
            out, err = worker.communicate(timeout=60)
            assert worker.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for worker in workers:
            worker.kill()
            worker.communicate()
    tokens = [r["token"] for r in results if r["token"] is not None]
    assert len(tokens) == 1
    assert sorted(v for r in results for v in r["versions"]) == list(range(1, 25))
    reg = SqliteRegistry(data_dir)
    assert reg.authenticate(tokens[0]).name == "admin"
    assert [t.name for t in reg.list_tenants()] == ["admin"]
    versions = reg.list_versions("admin", "shared", limit=100)
    by_version = {v: sha256(sources[i] / WEIGHTS_NAME)
                  for i, r in enumerate(results) for v in r["versions"]}
    for v in versions:
        assert sha256(v.path / WEIGHTS_NAME) == v.sha256 == by_version[v.version]
    assert blob_dirs(data_dir) == {v.path for v in versions}
    reg.close()
