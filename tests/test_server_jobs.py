"""Jobs of a real `cotune serve` that must not turn into zombies, and the admin's hold on every
tenant's jobs: a job that cannot be followed fails with the reason and frees its place, a job
stored in a state that cannot resume fails at the next start, an admin lists, cancels and
deletes across tenants (no tenant sees another's), and a job keeps only its newest training
states."""

from __future__ import annotations

import json
import sqlite3
import time

import grpc
import pytest
from server_helpers import TRAINING_DATA, running_server, start_server, tiny_adapter_dir
from wire import Caller, code_of

from cotune.v1 import adapters_pb2, tenants_pb2, training_pb2

pytestmark = pytest.mark.slow

FAILED, CANCELLED = training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED
LONG_JOB = dict(max_steps=100_000, batch_size=1)  # runs until it is stopped


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    with running_server(root, "--default-max-versions", "50") as running:
        running.root = root
        yield running


def last_events(caller: Caller, job_id: str) -> tuple[int, str]:
    """The job's final state and error, as its watchers hear them."""
    events = list(caller.watch(job_id, timeout=120))
    states = [e.state for e in events if e.WhichOneof("event") == "state"]
    errors = [e.error for e in events if e.WhichOneof("event") == "error"]
    return states[-1], errors[-1] if errors else ""


def list_jobs(caller: Caller, **fields) -> list:
    return list(caller.training.ListJobs(training_pb2.ListJobsRequest(**fields),
                                         metadata=caller.metadata).jobs)


def running(caller: Caller, job_id: str) -> None:
    """Returns once the job has made a step."""
    for event in caller.watch(job_id, timeout=120):
        if event.WhichOneof("event") == "progress":
            return


def test_a_job_refused_a_version_by_max_versions_per_adapter_fails_and_frees_its_place(
        server, admin):
    tenant = Caller(server.address, admin.new_tenant(
        "capped", max_versions_per_adapter=1, max_concurrent_jobs=1))
    job = tenant.create_job("tuned", TRAINING_DATA, max_steps=4, checkpoint_every=1, batch_size=2)
    state, error = last_events(tenant, job.id)
    assert state == FAILED
    assert "publishing version 2 of the job failed" in error
    assert "max_versions_per_adapter quota is 1" in error
    stored = tenant.training.GetJob(training_pb2.GetJobRequest(id=job.id),
                                    metadata=tenant.metadata)
    assert (stored.state, stored.error, list(stored.versions)) == (FAILED, error, ["tuned@v1"])
    assert [j.state for j in list_jobs(tenant)] == [FAILED]
    # its place among max_concurrent_jobs is free again
    second = tenant.create_job("other", TRAINING_DATA, max_steps=1, batch_size=2)
    assert last_events(tenant, second.id)[0] == training_pb2.JOB_STATE_SUCCEEDED
    tenant.close()


def test_a_job_keeps_the_training_state_of_its_newest_two_versions_only(server, admin):
    job = admin.create_job("pruned", TRAINING_DATA, max_steps=5, checkpoint_every=1, batch_size=2)
    assert last_events(admin, job.id)[0] == training_pb2.JOB_STATE_SUCCEEDED
    out = server.data_dir / "jobs" / job.id / "out" / "pruned"
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".state")) == \
        ["v4.state", "v5.state"]
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".state")) == \
        [f"v{k}" for k in range(1, 6)]
    versions = admin.adapters.ListVersions(adapters_pb2.ListVersionsRequest(name="pruned"),
                                           metadata=admin.metadata).versions
    assert [v.version for v in versions] == [1, 2, 3, 4, 5]


def test_an_admin_lists_and_cancels_every_tenants_jobs_and_a_tenant_only_its_own(
        server, admin):
    alice = Caller(server.address, admin.new_tenant("alice"))
    bob = Caller(server.address, admin.new_tenant("bob"))
    job = bob.create_job("long", TRAINING_DATA, **LONG_JOB)
    running(bob, job.id)
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: list_jobs(alice, all_tenants=True)) == denied
    assert code_of(lambda: alice.training.CancelJob(training_pb2.CancelJobRequest(
        id=job.id, all_tenants=True), metadata=alice.metadata)) == denied
    assert code_of(lambda: alice.training.CancelJob(training_pb2.CancelJobRequest(
        id=job.id), metadata=alice.metadata)) == grpc.StatusCode.NOT_FOUND
    assert job.id not in {j.id for j in list_jobs(alice)}
    listed = {j.id: j.tenant for j in list_jobs(admin, all_tenants=True)}
    assert listed[job.id] == "bob"
    assert job.id not in {j.id for j in list_jobs(admin)}  # without the flag: its own only
    assert code_of(lambda: admin.training.CancelJob(training_pb2.CancelJobRequest(
        id=job.id), metadata=admin.metadata)) == grpc.StatusCode.NOT_FOUND
    cancelled = admin.training.CancelJob(training_pb2.CancelJobRequest(
        id=job.id, all_tenants=True), metadata=admin.metadata)
    assert (cancelled.state, cancelled.tenant) == (CANCELLED, "bob")
    assert last_events(bob, job.id)[0] == CANCELLED

    def events(caller: Caller, **fields) -> list:
        return list(caller.training.ListJobEvents(training_pb2.ListJobEventsRequest(
            job_id=job.id, **fields), metadata=caller.metadata).events)

    stored = events(bob)
    assert events(admin, all_tenants=True) == stored  # an admin reads any tenant's events
    assert code_of(lambda: events(admin)) == grpc.StatusCode.NOT_FOUND  # without the flag
    assert code_of(lambda: events(alice, all_tenants=True)) == denied
    alice.close()
    bob.close()


def test_deleting_a_tenant_stops_its_tokens_at_once_cancels_its_job_and_removes_what_it_had(
        server, admin):
    token = admin.new_tenant("doomed")
    doomed = Caller(server.address, token)
    doomed.upload("kept", tiny_adapter_dir(server.root / "doomed-adapter", seed=2))
    job = doomed.create_job("long", TRAINING_DATA, **LONG_JOB)
    running(doomed, job.id)
    watch = doomed.watch(job.id)
    events = [next(watch)]  # the watch is open on the server before the tenant goes
    deleted = admin.tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(name="doomed"),
                                         metadata=admin.metadata)
    assert (deleted.adapters_deleted, deleted.versions_deleted, deleted.jobs_deleted,
            deleted.jobs_cancelled, deleted.tokens_deleted) == (1, 1, 1, 1, 1)
    assert code_of(lambda: list_jobs(doomed)) == grpc.StatusCode.UNAUTHENTICATED
    events += list(watch)  # the stream opened before ends: the job stopped
    assert [e.state for e in events if e.WhichOneof("event") == "state"][-1] == CANCELLED
    assert events[-1].error == "the job was deleted with its tenant"
    assert job.id not in {j.id for j in list_jobs(admin, all_tenants=True)}
    deadline = time.monotonic() + 60
    while (server.data_dir / "jobs" / job.id).exists():  # once the engine has stopped it
        assert time.monotonic() < deadline, "the deleted job's directory stayed"
        time.sleep(0.1)
    # the name again: a new, empty tenant
    again = Caller(server.address, admin.new_tenant("doomed"))
    assert list(again.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(),
                                            metadata=again.metadata).adapters) == []
    assert list_jobs(again) == []
    again.close()
    doomed.close()


def test_the_admin_tenant_cannot_be_deleted_nor_an_unknown_one(server, admin):
    for name, code, fragment in (
            ("admin", grpc.StatusCode.FAILED_PRECONDITION, "admin tenants cannot be deleted"),
            ("nobody", grpc.StatusCode.NOT_FOUND, "tenant 'nobody' not found")):
        with pytest.raises(grpc.RpcError) as refused:
            admin.tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(name=name),
                                       metadata=admin.metadata)
        assert refused.value.code() == code and fragment in refused.value.details()
    assert list_jobs(admin) is not None  # the admin still works


def test_quotas_a_new_tenant_is_given_override_only_the_server_defaults_they_name(
        server, admin):
    request = tenants_pb2.CreateTenantRequest(name="acme", quotas=tenants_pb2.Quotas(
        max_adapters=100, max_concurrent_jobs=2, max_tokens_per_minute=0))
    quotas = admin.tenants.CreateTenant(request, metadata=admin.metadata).quotas
    assert (quotas.max_adapters, quotas.max_concurrent_jobs) == (100, 2)
    # the server's defaults (--default-max-versions 50, --default-max-queued 64)
    assert (quotas.max_versions_per_adapter, quotas.max_queued_requests) == (50, 64)
    assert quotas.max_tokens_per_minute == 0  # named: no limit


def test_a_stored_job_that_cannot_resume_fails_at_the_next_start_and_lists(tmp_path):
    server = start_server(tmp_path)
    server.stop()
    with sqlite3.connect(server.data_dir / "registry.sqlite3") as db:  # as an older cotune
        # left a job of 10**9 epochs: running, its total steps past int32
        db.execute("INSERT INTO jobs (id, tenant, adapter, state, spec, error, created, "
                   "updated, versions, progress, owner) VALUES (?, 'admin', 'zombie', "
                   "'running', ?, '', 1, 1, '[]', ?, '')",
                   ("job-00000000000000ff", json.dumps({"epochs": 10**9}),
                    json.dumps({"step": 3, "total_steps": 5 * 10**9, "tokens": 90})))
    server = start_server(tmp_path, data_dir=server.data_dir)
    try:
        admin = Caller(server.address, server.admin_token)
        [job] = list_jobs(admin)
        assert (job.id, job.state, job.total_steps) == ("job-00000000000000ff", FAILED, 2**31 - 1)
        assert job.error.startswith("the job could not be resumed: epochs 1000000000 not "
                                    "accepted; accepted: a whole number from 1 to 10000")
        # the engine is free
        fresh = admin.create_job("fresh", TRAINING_DATA, max_steps=2, batch_size=2)
        assert last_events(admin, fresh.id)[0] == training_pb2.JOB_STATE_SUCCEEDED
        admin.close()
    finally:
        server.stop()
