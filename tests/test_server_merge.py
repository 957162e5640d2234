"""MergeAdapters through a real `cotune serve` on 127.0.0.1, by the SDK (sync and async) and
the CLI: a merged version is published like any other, serves, names its parents, weights and
method, and the refusals answer the right codes and publish nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from server_helpers import running_server, tiny_adapter_dir

from cotune.adapters.merging import IncompatibleParents, MergeSpec, merge_adapters
from cotune.adapters.peft_format import load_peft_adapter
from cotune.adapters.registry import VersionRecord
from cotune.client import (
    AsyncClient,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Quotas,
    ResourceExhausted,
)
from cotune.server.errors import RpcError, status_of
from cotune.server.merges import Merges, _common_base
from cotune.v1 import adapters_pb2

pytestmark = pytest.mark.slow

COTUNE = str(Path(sys.executable).parent / "cotune")
MODULES = {f"model.layers.{i}.self_attn.{p}": (64, 64 if p == "q_proj" else 32)
           for i in range(2) for p in ("q_proj", "v_proj")}  # the tiny model's, in its order


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server")) as server:
        yield server


@pytest.fixture(scope="module")
def parent_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parents")
    return {"a": tiny_adapter_dir(root / "a", seed=1), "b": tiny_adapter_dir(root / "b", seed=2),
            "wide": tiny_adapter_dir(root / "wide", seed=3, r=8),
            "q-only": tiny_adapter_dir(root / "q", seed=4, targets=("q_proj",))}


@pytest.fixture(scope="module")
def alice(server, parent_dirs):
    """A tenant's token, with the parents published as name@v1."""
    with Client(server.address, server.admin_token) as admin:
        admin.tenants.create("alice", quotas=Quotas(max_versions_per_adapter=3))
        token = admin.tenants.issue_token("alice").token
        admin.tenants.create("bob")
        with Client(server.address, admin.tenants.issue_token("bob").token) as bob:
            bob.adapters.create("bobs", parent_dirs["a"])
    with Client(server.address, token) as client:
        for name, path in parent_dirs.items():
            client.adapters.create(name, path)
    return token


@pytest.fixture
def client(server, alice):
    with Client(server.address, alice) as client:
        yield client


def test_a_merge_publishes_a_version_that_serves_and_names_its_parents(client, parent_dirs,
                                                                      tmp_path):
    version = client.adapters.merge("mix", {"a@v1": 0.7, "b": -0.3}, method="ties",
                                    density=0.5, description="a and less b")
    assert (version.ref, version.rank, version.alpha) == ("mix@v1", 4, 4.0)
    assert version.provenance["source"] == "merge"
    assert version.provenance["parents"] == [{"adapter": "alice/a@v1", "weight": 0.7},
                                             {"adapter": "alice/b@v1", "weight": -0.3}]
    assert version.provenance["hyperparameters"] == {
        "method": "ties", "density": 0.5, "majority_sign_method": "total"}
    assert client.adapters.get("mix").description == "a and less b"

    # the files are the merge of the parents' files, made here by the same math
    exported = client.adapters.export("mix@v1", tmp_path / "mix")
    expected = merge_adapters([load_peft_adapter(parent_dirs[n], MODULES, 16) for n in "ab"],
                              MergeSpec("ties", (0.7, -0.3), density=0.5), order=list(MODULES))
    served = load_peft_adapter(exported, MODULES, 16)
    for path, module in expected.modules.items():
        torch.testing.assert_close(served.modules[path].a, module.a, atol=0, rtol=0)
        torch.testing.assert_close(served.modules[path].b, module.b, atol=0, rtol=0)

    merged = client.complete("the cat", adapter="mix@v1", max_tokens=6, ignore_eos=True)
    plain = client.complete("the cat", max_tokens=6, ignore_eos=True)
    assert merged.completion_tokens == 6 and merged.text != plain.text


def test_a_merge_into_an_existing_adapter_is_its_next_version_and_a_retry_is_one(client):
    first = client.adapters.merge("a", [("a@v1", 1.0), ("wide", 1.0)], method="cat",
                                  idempotency_key="merge-into-a")
    again = client.adapters.merge("a", [("a@v1", 1.0), ("wide", 1.0)], method="cat",
                                  idempotency_key="merge-into-a")
    assert (first.ref, first.rank) == ("a@v2", 12) and again == first
    svd = client.adapters.merge("a", {"a@v1": 0.5, "wide@v1": 0.5}, method="svd", svd_rank=6)
    assert (svd.ref, svd.rank) == ("a@v3", 6)
    assert svd.provenance["hyperparameters"] == {"method": "svd", "svd_rank": 6}
    with pytest.raises(ResourceExhausted, match="max_versions_per_adapter"):  # a has 3
        client.adapters.merge("a", {"a@v1": 1.0}, method="linear")


@pytest.mark.parametrize(("parents", "options", "error", "fragment"), [
    ({"a@v1": 1.0, "b@v1": 1.0}, dict(method="best"), InvalidArgument,
     "accepted: linear, cat, svd"),
    ({"a@v1": 1.0, "b@v1": 1.0}, dict(method="dare_ties", density=1.5), InvalidArgument,
     "accepted: a density in (0, 1]"),
    ({"a@v1": 1.0, "b@v1": 1.0}, dict(method="ties"), InvalidArgument, "needs a density"),
    ({"a@v1": float("nan"), "b@v1": 1.0}, dict(method="linear"), InvalidArgument,
     "accepted: finite weights"),
    ({"a@v1": 0.0, "b@v1": 0.0}, dict(method="linear"), InvalidArgument, "every weight is zero"),
    ({}, dict(method="linear"), InvalidArgument, "accepted: 1 to 16 parents"),
    ([("a@v1", 0.1)] * 17, dict(method="linear"), InvalidArgument, "accepted: 1 to 16 parents"),
    ({"a@v1": 1.0, "wide@v1": 1.0}, dict(method="linear"), FailedPrecondition,
     "needs parents of one rank"),
    ({"a@v1": 1.0, "q-only@v1": 1.0}, dict(method="cat"), FailedPrecondition,
     "adapt different modules"),
    ([("a@v1", 1.0), ("wide@v1", 1.0), ("wide@v1", 1.0)], dict(method="cat"),
     FailedPrecondition, "exceeds max_rank 16 of this server"),
    ({"a@v1": 1.0, "nope@v1": 1.0}, dict(method="linear"), NotFound, "'nope' not found"),
    ({"a@v1": 1.0, "bobs@v1": 1.0}, dict(method="linear"), NotFound, "'bobs' not found"),
    ({"a@v1": 1.0, "b@v7": 1.0}, dict(method="linear"), NotFound, "not found"),
])
def test_a_refused_merge_answers_its_code_and_publishes_nothing(server, client, parents,
                                                                options, error, fragment):
    def stored():
        return ([(a.name, a.latest_version) for a in client.adapters.list()],
                sorted(p.name for p in (server.data_dir / "blobs").iterdir()))

    before = stored()
    with pytest.raises(error) as refused:
        client.adapters.merge("refused", parents, **options)
    assert fragment in str(refused.value)
    assert stored() == before
    assert list((server.data_dir / "uploads").iterdir()) == []  # nothing staged is left


def test_the_cli_merges_and_says_why_it_refuses(server, alice):
    env = dict(os.environ, COTUNE_ADDR=server.address, COTUNE_TOKEN=alice)

    def cotune(*args):
        return subprocess.run([COTUNE, "adapters", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    done = cotune("merge", "cli-mix", "--from", "a@v1:0.7", "--from", "b@v1:0.3", "--method",
                  "dare_ties", "--density", "0.5", "--seed", "3", "--json")
    assert done.returncode == 0, done.stderr
    version = json.loads(done.stdout)
    assert (version["name"], version["version"]) == ("cli-mix", 1)
    assert version["provenance"]["hyperparameters"] == {
        "method": "dare_ties", "density": 0.5, "majority_sign_method": "total", "seed": 3}
    assert [p["weight"] for p in version["provenance"]["parents"]] == [0.7, 0.3]
    listed = cotune("versions", "cli-mix")
    assert "alice/a@v1 x 0.7, alice/b@v1 x 0.3" in listed.stdout
    refused = cotune("merge", "cli-mix", "--from", "a@v1:0.7", "--method", "nope")
    assert refused.returncode == 2
    assert refused.stderr.startswith("cotune: error: INVALID_ARGUMENT: merge method 'nope'")
    missing = cotune("merge", "cli-mix", "--from", "bobs:1", "--method", "linear")
    assert missing.stderr.startswith("cotune: error: NOT_FOUND: ")


def test_the_async_client_merges_too(server, alice):
    async def merge():
        async with AsyncClient(server.address, alice) as client:
            return await client.adapters.merge("async-mix", {"a@v1": 2.0}, method="svd")

    version = asyncio.run(merge())
    assert version.ref == "async-mix@v1" and version.rank == 4  # one parent: linear
    assert version.provenance["hyperparameters"] == {"method": "linear",
                                                     "requested_method": "svd"}


def test_a_second_merge_while_one_runs_is_resource_exhausted():
    merges = Merges(registry=None, staging=None, base_modules=MODULES, max_rank=16,
                    max_bytes=1 << 20)
    request = adapters_pb2.MergeAdaptersRequest(
        name="x", method="linear", parents=[adapters_pb2.MergeParent(adapter="a", weight=1)])
    with merges._running:  # the merge that runs
        with pytest.raises(RpcError) as refused:
            merges.merge("alice", request)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "another merge is running" in refused.value.message


def test_parents_of_different_bases_are_refused():
    def version(name: str, base: str) -> VersionRecord:
        return VersionRecord("alice", name, 1, 4, 8.0, ("q_proj",), 0, "",
                             {"base_fingerprint": base}, 0.0, "")

    assert _common_base([version("a", "f1"), version("b", ""), version("c", "f1")],
                        ["a", "b", "c"]) == "f1"
    with pytest.raises(IncompatibleParents, match="different base models") as refused:
        _common_base([version("a", "f1"), version("b", "f2")], ["a@v1", "b@v1"])
    assert status_of(refused.value)[0] == grpc.StatusCode.FAILED_PRECONDITION
