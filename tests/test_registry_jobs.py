"""The registry's jobs, and workers sharing one registry: job states and quotas, the claim of
unowned jobs, and real processes publishing into one registry and data_dir (one of them killed
midway), on both backends; and SQLite's schema 1 migration."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from registry_helpers import UPLOAD, blob_dirs, legacy_registry, sha256, write_adapter

from cotune.adapters.blob_store import CONFIG_NAME, WEIGHTS_NAME
from cotune.adapters.migrations import MANAGED_BY_ALEMBIC
from cotune.adapters.registry import FailedPrecondition, NotFound, QuotaExceeded, Quotas
from cotune.adapters.schema_migrations import newest_revision
from cotune.adapters.sql_registry import SqliteRegistry
from cotune.server.job_leases import JobLeases

pytest_plugins = ["registry_fixtures"]  # files, data_dir, backend, open_here and registry


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


def test_a_job_whose_owners_lease_ends_is_taken_over_by_one_other_worker(registry):
    job = registry.create_job("acme", "foo", {}, owner="w1", lease_until=100.0)
    assert registry.claim_expired_jobs("w2", now=99.0, lease_until=200.0) == []
    assert registry.renew_leases("w1", [job.id], lease_until=130.0) == []  # still its own
    claimed = registry.claim_expired_jobs("w2", now=131.0, lease_until=200.0)
    assert [(j.id, j.owner, j.lease_until) for j in claimed] == [(job.id, "w2", 200.0)]
    assert registry.claim_expired_jobs("w3", now=131.0, lease_until=300.0) == []  # once
    assert registry.renew_leases("w1", [job.id], lease_until=160.0) == [job.id]  # lost it
    assert [j.id for j in registry.unfinished_jobs("w1", lease_until=160.0)] == []
    registry.update_job(job.id, state="succeeded")
    assert registry.renew_leases("w2", [job.id], lease_until=300.0) == [job.id]  # it ended
    assert registry.claim_expired_jobs("w3", now=1e12, lease_until=2e12) == []


def test_a_version_1_registry_gets_job_owners_and_keeps_its_jobs(data_dir):
    job_id = "job-0123456789abcdef"
    with legacy_registry(data_dir) as db:  # as cotune with schema 1 left it
        db.executescript(
            "DROP TABLE job_events; DROP TABLE files; CREATE TABLE v1 AS SELECT id, tenant, "
            "adapter, state, spec, error, created, updated, versions, progress FROM jobs; "
            "DROP TABLE jobs; ALTER TABLE v1 RENAME TO jobs; ALTER TABLE tenants DROP COLUMN "
            "deleted; PRAGMA user_version = 1; "
            "INSERT INTO tenants VALUES ('acme', 0, '{}', 1.0); "
            f"INSERT INTO jobs VALUES ('{job_id}', 'acme', 'foo', 'queued', "
            "'{\"steps\": 2}', '', 1.0, 1.0, '[]', '{}');")
    reg = SqliteRegistry(data_dir)
    job = reg.get_job("acme", job_id)
    assert (job.owner, job.spec, job.state) == ("", {"steps": 2}, "queued")
    assert reg.get_tenant("acme").name == "acme"  # tenants.deleted (schema 3): not deleted
    assert [j.id for j in reg.unfinished_jobs("worker-0")] == [job.id]
    reg.close()
    with sqlite3.connect(data_dir / "registry.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == MANAGED_BY_ALEMBIC
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == \
            newest_revision()


# --- processes --------------------------------------------------------------------------


_PUBLISH_FOREVER = """
import sys
from pathlib import Path
from cotune.adapters.sql_registry import open_registry
registry = open_registry(sys.argv[1], Path(sys.argv[2]))
sources = [Path(p) for p in sys.argv[3:]]
for i in range(10**6):
    registry.publish_version("acme", f"a{i % 2}", sources[i % len(sources)], {"source": "upload"})
    print(i, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_publishes_leaves_only_whole_versions(backend, open_here, registry_url,
                                                            data_dir, tmp_path):
    sources = [write_adapter(tmp_path / f"src{i}", seed=i, rank=8, features=512)
               for i in range(3)]  # ~33 KB of weights each: the kill often lands in a copy
    setup = open_here()
    setup.create_tenant("acme")
    setup.close()
    child = subprocess.Popen([sys.executable, "-c", _PUBLISH_FOREVER, registry_url,
                              str(data_dir), *map(str, sources)], stdout=subprocess.PIPE,
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
    reg = open_here()
    versions = [v for a in reg.list_adapters("acme")
                for v in reg.list_versions("acme", a.name, limit=1000)]
    assert len(versions) >= 30
    expected = {sha256(s / WEIGHTS_NAME) for s in sources}
    for v in versions:
        assert v.sha256 in expected and sha256(reg.version_dir(v) / WEIGHTS_NAME) == v.sha256
        assert json.loads((reg.version_dir(v) / CONFIG_NAME).read_text())["r"] == 8
    assert blob_dirs(data_dir) == {reg.version_dir(v) for v in versions}
    assert list((data_dir / "blobs" / ".staging").iterdir()) == []
    if backend == "sqlite":
        with sqlite3.connect(data_dir / "registry.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    latest = reg.get_adapter("acme", "a0").latest_version
    assert reg.publish_version("acme", "a0", sources[0], UPLOAD).version > latest
    reg.close()


_WORKER = """
import json, sys, time
from pathlib import Path
from cotune.adapters.sql_registry import open_registry
url, data_dir, source, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
registry = open_registry(url, data_dir)
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
def test_two_processes_share_one_registry(open_here, registry_url, data_dir, tmp_path):
    """Two workers on one data_dir: one makes the admin, versions never collide, a token one
    issued authenticates in the other, and opens beside them never sweep a blob in flight."""
    sources = [write_adapter(tmp_path / f"src{i}", seed=i, rank=8, features=256)
               for i in range(2)]
    open_here().close()
    go = tmp_path / "go"
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, registry_url, str(data_dir),
                                 str(source),
                                 str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for source in sources]
    try:
        go.touch()
        opens = 0
        while any(w.poll() is None for w in workers) or opens < 3:
            open_here().close()  # would sweep, were it alone
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
    reg = open_here()
    assert reg.authenticate(tokens[0]).name == "admin"
    assert [t.name for t in reg.list_tenants()] == ["admin"]
    versions = reg.list_versions("admin", "shared", limit=100)
    by_version = {v: sha256(sources[i] / WEIGHTS_NAME)
                  for i, r in enumerate(results) for v in r["versions"]}
    for v in versions:
        assert sha256(reg.version_dir(v) / WEIGHTS_NAME) == v.sha256 == by_version[v.version]
    assert blob_dirs(data_dir) == {reg.version_dir(v) for v in versions}
    reg.close()


_OPEN = """
import sys
from pathlib import Path
from cotune.adapters.sql_registry import open_registry
open_registry(sys.argv[1], Path(sys.argv[2])).close()
"""


@pytest.mark.slow
def test_workers_opening_a_new_registry_together_migrate_it_once(open_here, registry_url,
                                                                 tmp_path):
    workers = [subprocess.Popen([sys.executable, "-c", _OPEN, registry_url,
                                 str(tmp_path / "data")], stderr=subprocess.PIPE, text=True)
               for _ in range(4)]
    for worker in workers:
        assert worker.wait(timeout=120) == 0, worker.stderr.read()
        worker.stderr.close()
    registry = open_here()
    with registry._transaction() as db:
        assert [row[0] for row in db.execute("SELECT version_num FROM alembic_version")] == \
            [newest_revision()]
    registry.create_tenant("acme")  # whole: every table there
    registry.close()


def test_a_jobs_version_is_published_only_while_its_worker_owns_the_job(registry, files):
    job = registry.create_job("acme", "foo", {}, owner="w1", lease_until=100.0)
    kept = registry.publish_version("acme", "foo", files, UPLOAD, job_owner=(job.id, "w1"))
    registry.claim_expired_jobs("w2", now=101.0, lease_until=200.0)  # w1 was cut off
    with pytest.raises(FailedPrecondition, match=f"job {job.id} runs on worker 'w2' now, no "
                                                 "longer on 'w1'"):
        registry.publish_version("acme", "foo", files, UPLOAD, job_owner=(job.id, "w1"))
    assert [v.version for v in registry.list_versions("acme", "foo")] == [kept.version]
    assert registry.publish_version("acme", "foo", files, UPLOAD,
                                    job_owner=(job.id, "w2")).version == 2


def test_a_worker_holds_its_leases_only_until_they_would_end_unrenewed(registry):
    """What fences a worker's job files (JobManager._keep_checkpoints): past its lease with no
    renewal it no longer holds its jobs; a renewal holds them again."""
    leases = JobLeases(registry, "w1", 0.3, running=lambda: [], lost=lambda job_id: None,
                       claimed=lambda record: None)
    assert leases.holds()
    time.sleep(0.35)  # no renewal: cut off from the registry, or too busy to renew
    assert not leases.holds()
    leases.renew_and_claim()
    assert leases.holds()
