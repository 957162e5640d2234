"""Version blobs and uploaded files in an S3-compatible store, shared by workers on several
nodes: a real S3 HTTP server on 127.0.0.1 (s3_server) spoken to with boto3, each worker with
its own disk cache in its own data directory, and for the registry a real PostgreSQL server.
A version or file is readable from any node once stored and never half; the store going away
fails a publish cleanly."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from registry_helpers import UPLOAD, sha256, write_adapter

from cotune.adapters.blob_cache import BlobCache
from cotune.adapters.blob_store import CONFIG_NAME, FILES, WEIGHTS_NAME, StoreUnavailable
from cotune.adapters.s3_blob_store import S3BlobStore
from cotune.adapters.s3_bucket import S3Bucket
from cotune.adapters.sql_registry import open_registry
from cotune.adapters.stores import open_stores

pytest_plugins = ["registry_fixtures", "s3_server"]  # files, postgres_url; s3_server, s3_url


def bucket_of(url: str) -> str:
    return urlsplit(url).netloc


def test_a_blob_is_published_whole_and_read_from_another_node(s3_server, s3_url, files,
                                                              tmp_path):
    one = S3BlobStore(S3Bucket(s3_url), tmp_path / "node-1", 2**30)
    two = S3BlobStore(S3Bucket(s3_url), tmp_path / "node-2", 2**30)
    blob_id = one.publish(files)
    assert s3_server.keys(bucket_of(s3_url)) == [
        f"cluster-a/blobs/{blob_id}/{name}" for name in sorted(FILES)]
    assert one.directory(blob_id) == tmp_path / "node-1" / blob_id  # kept at publish
    fetched = two.directory(blob_id)
    assert fetched == tmp_path / "node-2" / blob_id
    for name in FILES:
        assert (fetched / name).read_bytes() == (files / name).read_bytes()
        with two.open(blob_id, name) as stream:  # an export: straight from the store
            assert stream.read() == (files / name).read_bytes()
    one.remove(blob_id)
    assert s3_server.keys(bucket_of(s3_url)) == [] and not (tmp_path / "node-1" / blob_id).exists()
    two.sweep(keep=set())  # its copy of a deleted version goes at its next start
    assert not fetched.exists()
    with pytest.raises(FileNotFoundError, match="in the blob store s3://"):
        two.directory(blob_id)
    with pytest.raises(ValueError, match="accepted: 32 lowercase hex digits"):
        two.directory("../registry")


def test_the_sweep_removes_only_orphans_old_enough_to_be_no_publish_in_flight(
        s3_server, s3_url, files, tmp_path):
    store = S3BlobStore(S3Bucket(s3_url), tmp_path / "node", 2**30)
    kept, orphan = store.publish(files), store.publish(files)
    assert store.sweep(keep={kept}) == []  # younger than an hour: maybe another's publish
    store.orphan_age_s = 0
    time.sleep(1.1)  # S3 keeps times to the second
    assert store.sweep(keep={kept}) == [orphan]
    assert {key.split("/")[2] for key in s3_server.keys(bucket_of(s3_url))} == {kept}


def test_a_bad_bucket_or_url_is_refused_at_start(s3_url, tmp_path):
    with pytest.raises(FileNotFoundError, match="in the blob store s3://no-such-bucket"):
        S3Bucket("s3://no-such-bucket/x")
    with pytest.raises(ValueError, match="accepted: s3://bucket or s3://bucket/prefix"):
        S3Bucket("https://bucket/x")


def test_the_cache_drops_the_least_recently_used_blobs_past_its_capacity(tmp_path):
    cache = BlobCache(tmp_path, capacity=3500, in_use_s=0)
    ids = [f"{i:032x}" for i in range(4)]

    def fill(into):
        (into / WEIGHTS_NAME).write_bytes(b"x" * 1000)

    for i, blob_id in enumerate(ids[:3]):
        cache.put(blob_id, fill)
        os.utime(tmp_path / blob_id, (100 + i, 100 + i))  # used in this order
    assert cache.get(ids[0]) is not None  # used again: the newest
    cache.put(ids[3], fill)  # 4000 bytes: the least recently used goes
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".staging") == \
        [ids[0], ids[2], ids[3]]
    assert cache.get(ids[1]) is None


def test_a_publish_while_the_store_is_away_fails_cleanly_and_lists_nothing(
        s3_server, s3_url, postgres_url, files, tmp_path):
    registry = open_registry(postgres_url, tmp_path / "data",
                             stores=open_stores(s3_url, tmp_path / "data", 2**30))
    registry.create_tenant("acme")
    registry.publish_version("acme", "foo", files, UPLOAD)
    s3_server.stop()
    try:
        with pytest.raises(StoreUnavailable, match=(
                rf"the blob store {s3_url} is unavailable \(.*\); the call may be retried")):
            registry.publish_version("acme", "foo", files, UPLOAD)
    finally:
        s3_server.start()
    assert [v.version for v in registry.list_versions("acme", "foo")] == [1]
    assert len(s3_server.keys(bucket_of(s3_url))) == 2  # the first version's, nothing half
    assert list((tmp_path / "data" / "blob-cache" / ".staging").iterdir()) == []
    assert registry.publish_version("acme", "foo", files, UPLOAD).version == 2  # back again
    registry.close()


def test_eight_publishers_on_two_workers_lose_no_version_and_tear_none(
        s3_url, postgres_url, tmp_path):
    workers = [open_registry(postgres_url, tmp_path / f"node-{i}",
                             stores=open_stores(s3_url, tmp_path / f"node-{i}", 2**30))
               for i in range(2)]
    workers[0].create_tenant("acme")
    sources = [write_adapter(tmp_path / f"src{i}", seed=i, rank=8, features=256)
               for i in range(8)]

    def publish(i: int) -> list[int]:
        worker = workers[i % 2]
        return [worker.publish_version("acme", "shared", sources[i], UPLOAD).version
                for _ in range(3)]

    with ThreadPoolExecutor(8) as pool:
        published = list(pool.map(publish, range(8)))
    assert sorted(v for versions in published for v in versions) == list(range(1, 25))
    source_of = {v: i for i, versions in enumerate(published) for v in versions}
    for reader in workers:  # every version whole, through either node's cache
        versions = reader.list_versions("acme", "shared", limit=100)
        assert [v.version for v in versions] == list(range(1, 25))
        for version in versions:
            stored = reader.version_dir(version)
            assert sha256(stored / WEIGHTS_NAME) == version.sha256 == \
                sha256(sources[source_of[version.version]] / WEIGHTS_NAME)
            assert (stored / CONFIG_NAME).read_bytes() == \
                (sources[source_of[version.version]] / CONFIG_NAME).read_bytes()
    for worker in workers:
        worker.close()


def test_a_file_uploaded_through_one_worker_is_read_and_deleted_through_another(
        s3_server, s3_url, postgres_url, tmp_path):
    workers = [open_registry(postgres_url, tmp_path / f"node-{i}",
                             stores=open_stores(s3_url, tmp_path / f"node-{i}", 2**30))
               for i in range(2)]
    workers[0].create_tenant("acme")
    staged = tmp_path / "node-0" / "upload"
    staged.write_bytes(b'{"text": "hello"}\n')
    record = workers[0].add_file("acme", "a.jsonl", "fine-tune", staged)
    assert not staged.exists()  # moved into the store
    assert s3_server.keys(bucket_of(s3_url)) == [f"cluster-a/files/{record.id}"]
    with workers[1].open_file(workers[1].get_file("acme", record.id)) as stream:
        assert stream.read() == b'{"text": "hello"}\n'
    workers[1].delete_file("acme", record.id)
    assert s3_server.keys(bucket_of(s3_url)) == []
    with pytest.raises(FileNotFoundError):
        workers[0].open_file(record).read()
    for worker in workers:
        worker.close()
