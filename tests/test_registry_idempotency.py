"""Idempotency keys of the registry's creating calls, on both backends: a call repeated with its
key creates nothing and raises Repeated with what the first created, even when the two race;
a key reused for another request is refused; keys go with their tenant."""

from __future__ import annotations

import threading

import pytest
from registry_helpers import UPLOAD

from cotune.adapters.registry import Idempotency, Repeated

pytest_plugins = ["registry_fixtures"]  # files, data_dir, backend, open_here and registry

KEY = Idempotency("retry-1", "sha256:request")


def test_a_repeated_publish_publishes_nothing_and_answers_the_first_version(registry, files):
    first = registry.publish_version("acme", "foo", files, UPLOAD, idempotency=KEY)
    assert registry.repeated("acme", "CreateAdapter", KEY) == first
    with pytest.raises(Repeated) as repeated:
        registry.publish_version("acme", "foo", files, UPLOAD, idempotency=KEY)
    assert repeated.value.earlier == first
    assert [v.version for v in registry.list_versions("acme", "foo")] == [1]
    assert registry.repeated("globex", "CreateAdapter", KEY) is None  # keys are per tenant
    assert registry.repeated("acme", "CreateJob", KEY) is None  # and per call
    other = Idempotency(KEY.key, "sha256:another-request")
    with pytest.raises(ValueError, match="idempotency key 'retry-1' was used by another "
                                         "CreateAdapter request in the last 24 hours"):
        registry.publish_version("acme", "foo", files, UPLOAD, idempotency=other)


def test_a_repeated_create_job_creates_no_other_job(registry):
    first = registry.create_job("acme", "foo", {"steps": 2}, idempotency=KEY)
    with pytest.raises(Repeated) as repeated:
        registry.create_job("acme", "foo", {"steps": 2}, idempotency=KEY)
    assert repeated.value.earlier == first == registry.repeated("acme", "CreateJob", KEY)
    assert [job.id for job in registry.list_jobs("acme")] == [first.id]


def test_calls_racing_with_one_key_make_one_version(registry, files):
    outcomes, start = [], threading.Barrier(6)

    def publish() -> None:
        start.wait()
        try:
            outcomes.append(registry.publish_version("acme", "foo", files, UPLOAD,
                                                     idempotency=KEY))
        except Repeated as repeated:
            outcomes.append(repeated.earlier)

    threads = [threading.Thread(target=publish) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 6 and all(outcome == outcomes[0] for outcome in outcomes)
    assert [v.version for v in registry.list_versions("acme", "foo")] == [1]


def test_malformed_keys_are_refused_and_keys_go_with_their_tenant(registry, files):
    for bad in ("", "a" * 129, "has space", "ü", "../x"):
        with pytest.raises(ValueError, match="accepted: 1-128 of A-Z a-z 0-9 . _ : -"):
            Idempotency(bad, "sha256:request")
    registry.publish_version("acme", "foo", files, UPLOAD, idempotency=KEY)
    registry.delete_tenant("acme")
    registry.create_tenant("acme")
    assert registry.repeated("acme", "CreateAdapter", KEY) is None
    assert registry.publish_version("acme", "foo", files, UPLOAD, idempotency=KEY).version == 2
