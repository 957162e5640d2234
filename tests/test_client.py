"""The SDK (`cotune.client`) against a real `cotune serve` on 127.0.0.1: errors, pagination,
export, streaming and its cancellation, retries, the async client, and no torch on import."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import grpc
import pytest
from conftest import tiny_tokenizer
from server_helpers import running_server, tiny_adapter_dir, tiny_model_dir

from cotune.client import (
    AlreadyExists,
    AsyncClient,
    Client,
    CotuneError,
    DataLoss,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Quotas,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from cotune.client.files import ADAPTER_FILES, ExportWriter
from cotune.engine.runtime import Request, Runtime
from cotune.v1 import common_pb2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server")) as server:
        yield server


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [tiny_adapter_dir(root / f"a{seed}", seed=seed) for seed in range(2)]


@pytest.fixture
def client(server):
    with Client(server.address, server.admin_token) as client:
        yield client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_errors_are_the_class_of_their_status_and_carry_the_server_message(server, client):
    with pytest.raises(NotFound) as missing:
        client.adapters.get("no-such-adapter")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-adapter" in missing.value.message
    assert str(missing.value).startswith("NOT_FOUND: ") and missing.value.message in str(
        missing.value)
    with pytest.raises(InvalidArgument, match="not a valid reference"):
        client.adapters.get("not a name!")
    client.tenants.create("err-tenant")
    with pytest.raises(AlreadyExists, match="err-tenant"):
        client.tenants.create("err-tenant")
    tenant_token = client.tenants.issue_token("err-tenant").token
    with Client(server.address, tenant_token) as tenant, pytest.raises(PermissionDenied):
        list(tenant.tenants.list())
    with Client(server.address, "ct_bad_token") as stranger, pytest.raises(Unauthenticated):
        stranger.model_info()
    assert issubclass(Unauthenticated, CotuneError)


def test_listing_iterates_over_every_page(client, adapter_dirs):
    names = [f"page-{i}" for i in range(5)]
    for name in names:
        client.adapters.create(name, adapter_dirs[0], labels={"suite": "pages"})
    for _ in range(3):
        client.adapters.create("page-0", adapter_dirs[1])
    listed = [a.name for a in client.adapters.list(labels={"suite": "pages"}, page_size=2)]
    assert sorted(listed) == names
    assert [a.name for a in client.adapters.list(name_prefix="page-", page_size=1)] == listed
    versions = list(client.adapters.versions("page-0", page_size=1))
    assert [v.version for v in versions] == [1, 2, 3, 4]
    assert versions[-1].ref == "page-0@v4" and versions[0].provenance["source"] == "upload"


def test_export_writes_the_files_whole_and_refuses_an_existing_dest(client, adapter_dirs,
                                                                    tmp_path):
    created = client.adapters.create("exported", adapter_dirs[1], description="for export")
    dest = client.adapters.export(f"exported@v{created.version}", tmp_path / "out")
    for name in ADAPTER_FILES:
        assert (dest / name).read_bytes() == (adapter_dirs[1] / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left over
    with pytest.raises(FileExistsError):
        client.adapters.export("exported", dest)
    with pytest.raises(NotFound):
        client.adapters.export("never-created", tmp_path / "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_dora_adapter_serves_as_in_process_and_exports_as_it_came(server, client, tmp_path):
    dora = tiny_adapter_dir(tmp_path / "dora", seed=5, targets=("q_proj", "v_proj", "up_proj"),
                            dora=True)
    client.adapters.create("dora", dora)
    prompt = [5, 9, 14, 3, 27]
    served = client.complete(prompt, adapter="dora", max_tokens=8, ignore_eos=True).token_ids
    with Runtime.load(tiny_model_dir(server.data_dir.parent)) as runtime:
        local = runtime.generate([Request(prompt_token_ids=prompt, adapter=str(dora),
                                          max_tokens=8, ignore_eos=True)])[0].token_ids
    assert list(served) == local
    exported = client.adapters.export("dora", tmp_path / "exported")
    for name in ADAPTER_FILES:
        assert (exported / name).read_bytes() == (dora / name).read_bytes()


def test_export_writer_refuses_a_file_name_outside_the_adapter(tmp_path):
    writer = ExportWriter(tmp_path / "dest")
    writer.add(common_pb2.FileChunk(path="adapter_config.json", data=b"{}"))
    with pytest.raises(DataLoss, match="'../escape'"):
        writer.add(common_pb2.FileChunk(path="../escape", data=b"x"))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_generate_streams_deltas_that_join_into_the_completion(client, adapter_dirs):
    client.adapters.create("streamer", adapter_dirs[0])
    options = dict(adapter="streamer", max_tokens=12, ignore_eos=True)
    deltas = list(client.generate("Once upon a time", **options))
    assert deltas[0].adapter == "streamer@v1"
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 12
    assert all(d.finish_reason is None for d in deltas[:-1])
    completion = client.complete("Once upon a time", **options)
    assert completion.text == "".join(d.text for d in deltas)
    assert list(completion.token_ids) == [t for d in deltas for t in d.token_ids]
    assert completion.completion_tokens == 12 and completion.adapter == "streamer@v1"


def test_breaking_out_of_generate_stops_the_request_on_the_server(server, client):
    # The tenant may use 120 tokens a minute: a generation of 240 that ran on after the break
    # would use them up (in about half a second), and the server would refuse the next one.
    client.tenants.create("breaker", quotas=Quotas(max_tokens_per_minute=120))
    with Client(server.address, client.tenants.issue_token("breaker").token) as tenant:
        for delta in tenant.generate("Hello", max_tokens=240, ignore_eos=True):
            assert delta.token_ids
            break  # leaving the loop drops the iterator, which closes it and cancels the call
        time.sleep(1.5)
        assert tenant.complete("Hello", max_tokens=4, ignore_eos=True).completion_tokens == 4
        # the control: a generation read to its end does use up the quota
        assert len(list(tenant.generate("Hello", max_tokens=240, ignore_eos=True))) > 1
        with pytest.raises(ResourceExhausted, match="max_tokens_per_minute"):
            tenant.complete("Hello", max_tokens=4)


def test_unavailable_is_retried_with_backoff_then_raised():
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    for retries, least_backoff_s in ((0, 0.0), (3, 0.05 + 0.1 + 0.2)):
        with Client(address, "token", retries=retries) as client:
            start = time.monotonic()
            with pytest.raises(Unavailable):
                client.model_info()
            assert least_backoff_s <= time.monotonic() - start < 20
    with Client(address, "token", retries=2) as client, pytest.raises(Unavailable):
        list(client.generate("a stream that never started is retried too"))


def test_a_job_publishes_its_checkpoints_as_versions(client):
    data = b'{"prompt": "2+2=", "completion": "4"}\n' * 16
    job = client.jobs.create("trained", data, rank=4, max_steps=4, checkpoint_every=2,
                             batch_size=2, min_share=0.25)
    assert job.hyperparameters["min_share"] == 0.25  # its floor, as the job runs with it
    kinds = {event.kind for event in client.jobs.watch(job.id)}
    done = client.jobs.wait(job.id, timeout=60)
    assert done.state == "succeeded" and done.done
    assert list(done.versions) == ["trained@v1", "trained@v2"]
    assert "state" in kinds
    assert job.id in {j.id for j in client.jobs.list(state="succeeded")}
    assert [v.provenance["job_id"] for v in client.adapters.versions("trained")] == [job.id] * 2


def test_a_job_trains_on_an_uploaded_file_and_its_events_are_read_back(client, tmp_path):
    path = tmp_path / "cats.jsonl"
    path.write_bytes(b'{"text": "the cat sat on the mat"}\n' * 4)
    file = client.files.upload(path)
    assert (file.filename, file.size_bytes) == ("cats.jsonl", path.stat().st_size)
    assert client.files.get(file.id) == file and client.files.content(file.id) == \
        path.read_bytes()
    assert file.id in [f.id for f in client.files.list(purpose="fine-tune")]
    with pytest.raises(InvalidArgument, match="upload.jsonl:1: invalid JSON"):
        client.files.upload(b"not json\n")
    job = client.jobs.create("from-file", training_file=file.id, batch_size=2)
    assert job.training_file == file.id
    assert client.jobs.wait(job.id, timeout=60).state == "succeeded"
    events = list(client.jobs.events(job.id, page_size=2))  # over several pages
    assert [e.sequence for e in events] == list(range(len(events), 0, -1))
    assert (events[0].kind, events[0].state) == ("state", "succeeded")
    assert [e.version for e in events if e.kind == "checkpoint"] == ["from-file@v1"]
    client.files.delete(file.id)
    with pytest.raises(NotFound):
        client.files.get(file.id)


def test_tenants_see_only_their_own_adapters_and_quotas_change_one_at_a_time(server, client,
                                                                             adapter_dirs):
    client.tenants.create("quiet", quotas=Quotas(max_adapters=5, max_concurrent_jobs=1))
    changed = client.tenants.set_quotas("quiet", max_concurrent_jobs=2)
    assert changed.quotas.max_adapters == 5 and changed.quotas.max_concurrent_jobs == 2
    issued = client.tenants.issue_token("quiet", "sdk test")
    client.adapters.create("admins-only", adapter_dirs[0])
    with Client(server.address, issued.token) as tenant:
        assert list(tenant.adapters.list()) == []
        tenant.adapters.create("mine", adapter_dirs[1])
        assert [a.name for a in tenant.adapters.list()] == ["mine"]
    assert client.tenants.revoke_token(issued.id) is True
    with Client(server.address, issued.token) as revoked, pytest.raises(Unauthenticated):
        list(revoked.adapters.list())


def test_health_and_model_info_need_no_more_than_a_connection(server, client):
    with Client(server.address, token="") as anonymous:
        assert anonymous.health() == "SERVING"
    info = client.model_info()
    assert info.vocab_size > 0 and info.max_rank == 16
    assert client.tokenize("hello") and all(isinstance(t, int) for t in client.tokenize("hi"))
    chat = [{"role": "user", "content": "hi"}]
    rendered = tiny_tokenizer().apply_chat_template(chat, tokenize=False,
                                                    add_generation_prompt=True)
    assert client.tokenize(chat=chat) == client.tokenize(rendered)  # the assistant's turn open
    with pytest.raises(ValueError, match="one of them"):
        client.tokenize("hi", chat=chat)


def test_async_client_has_the_surface_of_the_sync_one(server, adapter_dirs, tmp_path):
    async def scenario():
        async with AsyncClient(server.address, server.admin_token) as client:
            created = await client.adapters.create("async-one", adapter_dirs[0])
            names = [a.name async for a in client.adapters.list(name_prefix="async-")]
            deltas = [d async for d in client.generate("Hi", adapter="async-one",
                                                       max_tokens=5, ignore_eos=True)]
            completion = await client.complete("Hi", adapter="async-one", max_tokens=5,
                                               ignore_eos=True)
            exported = await client.adapters.export("async-one", tmp_path / "async-export")
            with pytest.raises(NotFound, match="async-missing"):
                await client.adapters.get("async-missing")
            await client.tenants.create("async-tenant", quotas=Quotas(max_adapters=3))
            tenant = await client.tenants.set_quotas("async-tenant", max_concurrent_jobs=1)
            job = await client.jobs.create("async-one", b'{"text": "hi there"}\n' * 4,
                                           max_steps=2)
            done = await client.jobs.wait(job.id, timeout=60)
            return created, names, deltas, completion, exported, tenant, done

    created, names, deltas, completion, exported, tenant, done = asyncio.run(scenario())
    assert (tenant.quotas.max_adapters, tenant.quotas.max_concurrent_jobs) == (3, 1)
    assert done.state == "succeeded" and done.versions == ("async-one@v2",)
    assert created.ref == "async-one@v1" and names == ["async-one"]
    assert "".join(d.text for d in deltas) == completion.text
    assert completion.completion_tokens == 5
    assert sorted(p.name for p in exported.iterdir()) == sorted(ADAPTER_FILES)


def test_importing_the_sdk_loads_no_torch_numpy_or_engine():
    code = ("import sys, cotune.client; print(sorted(m for m in sys.modules if m.split('.')[0]"
            " in ('torch', 'numpy') or m.startswith(('cotune.engine', 'cotune.model', "
            "'cotune.server'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
