"""Workers of a cluster on one PostgreSQL registry and one S3 store (`cotune serve --registry
--blobs`): real `cotune serve` processes with separate data directories, as on separate nodes,
against a real PostgreSQL server and a real S3 HTTP server. Tenants, tokens, quotas and adapter
versions are the cluster's: what one worker takes in, another serves. A worker whose database
goes away refuses calls with UNAVAILABLE, naming the registry, finishes the generations it
runs, and recovers when the database is back."""

from __future__ import annotations

import hashlib
import re
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from server_helpers import TRAINING_DATA, running_server, start_server, tiny_adapter_dir
from sqlalchemy.engine import make_url

from cotune.client import (
    Client,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

pytestmark = pytest.mark.slow
pytest_plugins = ["postgres_server", "s3_server"]


@pytest.fixture
def cluster_args(postgres_server, postgres_url, s3_server, s3_url, tmp_path):
    """The serve arguments and environment every worker of one cluster shares: the registry's
    URL without its password (that comes from $PGPASSWORD), the store's URL (its endpoint and
    keys from boto3's environment) and a preset admin token."""
    admin_token = tmp_path / "admin.token"
    admin_token.write_text(f"ct_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}")
    server, database = postgres_server, make_url(postgres_url).database
    url = f"postgresql://{server.user}@{server.host}:{server.port}/{database}"
    args = ("--registry", url, "--blobs", s3_url, "--admin-token-file", str(admin_token))
    return args, {"PGPASSWORD": postgres_server.password, **s3_server.environment}


def test_workers_on_separate_nodes_share_tenants_tokens_quotas_and_versions(cluster_args,
                                                                            tmp_path):
    args, env = cluster_args
    with running_server(tmp_path, *args, "--worker-id", "node-1", data_dir=tmp_path / "node-1",
                        env=env) as one, \
            running_server(tmp_path, *args, "--worker-id", "node-2",
                           data_dir=tmp_path / "node-2", env=env) as two:
        assert one.admin_token == two.admin_token
        with Client(one.address, one.admin_token) as admin:
            admin.tenants.create("acme", max_adapters=1)
            token = admin.tenants.issue_token("acme")
            admin.tenants.create("metered", max_tokens_per_minute=40)
            metered = admin.tenants.issue_token("metered")
        with Client(one.address, metered.token) as on_one, \
                Client(two.address, metered.token) as on_two:
            on_one.complete("the cat", max_tokens=30, ignore_eos=True)  # 30 and the prompt's
            deadline = time.monotonic() + 30
            while True:  # worker two hears of them at its next exchange (every 5 s)
                try:
                    on_two.complete("a", max_tokens=1)
                except ResourceExhausted as refused:
                    elsewhere = re.search(r"\((\d+) of them on other workers\)", str(refused))
                    assert elsewhere and int(elsewhere[1]) >= 30, str(refused)
                    break
                assert time.monotonic() < deadline, "worker two never counted worker one's"
                time.sleep(2.5)
        uploaded = tiny_adapter_dir(tmp_path / "a", seed=1)
        with Client(one.address, token.token) as on_one, \
                Client(two.address, token.token) as on_two:
            on_one.adapters.create("first", uploaded, idempotency_key="upload-1")
            assert [a.name for a in on_two.adapters.list()] == ["first"]
            # a retry through another worker (its reply lost): the same version, no other
            retried = on_two.adapters.create("first", uploaded, idempotency_key="upload-1")
            assert retried.version == 1
            # 8 publishers at once, 4 through each worker: no version lost, none torn
            sources = [tiny_adapter_dir(tmp_path / f"p{i}", seed=10 + i) for i in range(8)]
            with ThreadPoolExecutor(8) as pool:
                published = list(pool.map(lambda i: (on_one, on_two)[i % 2].adapters.create(
                    "first", sources[i]), range(8)))
            assert sorted(v.version for v in published) == list(range(2, 10))
            for i, version in enumerate(published):  # read back through the other worker
                exported = (on_two, on_one)[i % 2].adapters.export(
                    version.ref, tmp_path / f"read-{i}")
                weights = (exported / "adapter_model.safetensors").read_bytes()
                assert weights == (sources[i] / "adapter_model.safetensors").read_bytes()
                assert hashlib.sha256(weights).hexdigest() == version.sha256
            greedy = dict(adapter="first@v1", max_tokens=12, ignore_eos=True)
            served = on_two.complete("the cat sat", **greedy)  # from the store, not a disk
            assert served.token_ids == on_one.complete("the cat sat", **greedy).token_ids
            on_two.adapters.export("first@v1", tmp_path / "exported")
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                assert (tmp_path / "exported" / name).read_bytes() == \
                    (uploaded / name).read_bytes()
            with pytest.raises(ResourceExhausted, match="has 1 adapters, its max_adapters"):
                on_two.adapters.create("second", tiny_adapter_dir(tmp_path / "b", seed=2))
            job = on_one.jobs.create("first", TRAINING_DATA, max_steps=2, idempotency_key="job-1")
            again = on_two.jobs.create("first", TRAINING_DATA, max_steps=2, idempotency_key="job-1")
            assert again.id == job.id and [j.id for j in on_two.jobs.list()] == [job.id]
            with pytest.raises(InvalidArgument, match="'job-1' was used by another CreateJob"):
                on_two.jobs.create("first", TRAINING_DATA, max_steps=3, idempotency_key="job-1")
            on_one.jobs.wait(job.id, timeout=120)
            endless = on_one.jobs.create("first", TRAINING_DATA, max_steps=100_000, batch_size=1)
            assert on_two.jobs.cancel(endless.id).state == "cancelled"  # not its worker
            events = list(on_one.jobs.watch(endless.id, timeout=60))  # its worker stops it
            assert [e.state for e in events if e.kind == "state"][-1] == "cancelled"
            with Client(two.address, two.admin_token) as admin_on_two:
                assert admin_on_two.tenants.revoke_token(token.id)
            with pytest.raises(Unauthenticated):  # revoked on one worker, refused by the other
                list(on_one.adapters.list())


def test_a_worker_whose_registry_goes_away_refuses_calls_finishes_generations_and_recovers(
        postgres_server, cluster_args, tmp_path):
    args, env = cluster_args
    with running_server(tmp_path, *args, env=env) as server, \
            Client(server.address, server.admin_token) as admin:
        assert list(admin.adapters.list()) == []
        # authenticated and running before the database goes (the tiny model may finish it
        # before the database is down; what must not happen is that it is cut)
        stream = admin.generate("the cat", max_tokens=250, ignore_eos=True)
        first = next(stream)
        rest: list = []
        reader = threading.Thread(target=lambda: rest.extend(stream))
        reader.start()
        postgres_server.stop()
        try:
            with pytest.raises(Unavailable, match=(
                    r"the registry postgresql://cotune@127\.0\.0\.1:\d+/\w+ is unavailable "
                    r"\(.*\); nothing was changed, and the call may be retried")) as refused:
                list(admin.adapters.list())
            assert postgres_server.password not in str(refused.value)
            reader.join(timeout=120)
            assert not reader.is_alive()
            tokens = len(first.token_ids) + sum(len(delta.token_ids) for delta in rest)
            assert tokens == 250 and rest[-1].finish_reason == "length"
        finally:
            postgres_server.start()
        deadline = time.monotonic() + 30
        while True:  # the pool's connections died with the server: each is replaced once
            try:
                assert list(admin.adapters.list()) == []
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the worker did not recover"
                time.sleep(0.5)


def test_a_job_whose_store_goes_away_publishes_its_versions_at_a_later_checkpoint(
        s3_server, cluster_args, tmp_path):
    args, env = cluster_args
    with running_server(tmp_path, *args, env=env) as server, \
            Client(server.address, server.admin_token) as admin:
        s3_server.stop()
        try:
            job = admin.jobs.create("tuned", TRAINING_DATA, max_steps=60, checkpoint_every=3,
                                    batch_size=1)
            for event in admin.jobs.watch(job.id, timeout=120):
                if event.kind == "evaluation" and event.step >= 6:
                    break  # two checkpoints the store was away for
            with pytest.raises(NotFound):
                admin.adapters.get("tuned")
        finally:
            s3_server.start()
        done = admin.jobs.wait(job.id, timeout=300)
        assert (done.state, done.error) == ("succeeded", "")
        versions = list(admin.adapters.versions("tuned"))
        assert [v.version for v in versions] == list(range(1, 21))  # none lost, in order
        # each the child of the one before, as the trainer made them
        assert [v.provenance["parent_version"] for v in versions] == [None, *range(1, 20)]


def test_a_job_outlives_the_kill_9_of_its_worker_and_ends_on_another_with_the_same_losses(
        cluster_args, tmp_path):
    args, env = cluster_args
    lease = ("--job-lease-seconds", "2")
    job_settings = dict(max_steps=6, checkpoint_every=2, batch_size=2, seed=3)
    one = start_server(tmp_path, *args, *lease, "--worker-id", "node-1",
                       data_dir=tmp_path / "node-1", env=env)
    try:
        with running_server(tmp_path, *args, *lease, "--worker-id", "node-2",
                            data_dir=tmp_path / "node-2", env=env) as two, \
                Client(two.address, two.admin_token) as on_two:
            reference = on_two.jobs.create("reference", TRAINING_DATA, **job_settings)
            assert on_two.jobs.wait(reference.id, timeout=300).state == "succeeded"
            with Client(one.address, one.admin_token) as on_one:
                job = on_one.jobs.create("interrupted", TRAINING_DATA, **job_settings)
                for event in on_one.jobs.watch(job.id, timeout=120):
                    if event.kind == "checkpoint":  # its first version, then the kill
                        break
            one.stop(signal.SIGKILL)
            deadline = time.monotonic() + 120
            while not (done := on_two.jobs.get(job.id)).done:  # node 2 takes it over
                assert time.monotonic() < deadline, done
                time.sleep(0.5)
            assert (done.state, done.owner, done.error) == ("succeeded", "node-2", "")
            losses = [[v.provenance["metrics"]["train_loss"] for v in on_two.adapters.versions(
                name)] for name in ("reference", "interrupted")]
            assert len(losses[1]) == 3 and losses[0] == losses[1]
            for name in ("reference", "interrupted"):  # the same weights, bit for bit
                on_two.adapters.export(f"{name}@v3", tmp_path / name)
            assert (tmp_path / "reference" / "adapter_model.safetensors").read_bytes() == \
                (tmp_path / "interrupted" / "adapter_model.safetensors").read_bytes()
    finally:
        one.stop(signal.SIGKILL)
