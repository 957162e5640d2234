"""The calls a client holds open (uploads, exports, job watches) on a real `cotune serve` with
small bounds: one tenant holds at most --max-open-streams-per-tenant of them, tenants that
are not admins leave the last place of --max-open-streams to the admins, and an upload that
sends nothing for --upload-idle-timeout ends with DEADLINE_EXCEEDED and frees its place,
nothing of it kept. A hostile tenant holding every place it can stops neither another
tenant's upload nor the admin's."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import grpc
import pytest
from server_helpers import running_server, tiny_adapter_dir
from wire import Caller

from cotune.v1 import adapters_pb2, common_pb2

pytestmark = pytest.mark.slow

OPEN_STREAMS, PER_TENANT, IDLE_S = 6, 2, 2.0  # the server's bounds
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    with running_server(root, "--max-open-streams", str(OPEN_STREAMS),
                        "--max-open-streams-per-tenant", str(PER_TENANT),
                        "--upload-idle-timeout", str(IDLE_S)) as running:
        running.adapter = tiny_adapter_dir(root / "adapter", seed=2)
        yield running


@pytest.fixture(scope="module")
def tenant(server, admin):
    """Callers of new tenants, by name, closed at the end of the module."""
    made: list[Caller] = []

    def make(name: str) -> Caller:
        made.append(Caller(server.address, admin.new_tenant(name)))
        return made[-1]

    yield make
    for caller in made:
        caller.close()


def _header(name: str) -> adapters_pb2.CreateAdapterRequest:
    return adapters_pb2.CreateAdapterRequest(header=adapters_pb2.CreateAdapterHeader(name=name))


def _chunk(data: bytes) -> adapters_pb2.CreateAdapterRequest:
    return adapters_pb2.CreateAdapterRequest(chunk=common_pb2.FileChunk(
        path="adapter_config.json", data=data))


@contextmanager
def trickling_uploads(caller: Caller, count: int):
    """`count` uploads of `caller` that never finish yet are never idle: a byte every 0.3 s,
    the way a hostile tenant keeps its places past the idle timeout. On leaving, they stop
    sending and each ends as an upload without weights."""
    stop = threading.Event()

    def messages():
        yield _header("held")
        yield _chunk(b"{")
        while not stop.wait(0.3):
            yield _chunk(b" ")

    calls = [caller.adapters.CreateAdapter.future(messages(), metadata=caller.metadata,
                                                  timeout=120) for _ in range(count)]
    try:
        yield calls
    finally:
        stop.set()
        for call in calls:
            call.exception(60)  # ended: its place is free again


def wait_for_refusals(calls: list, count: int) -> list:
    """The `count` calls refused at once (the others stay open), each RESOURCE_EXHAUSTED."""
    deadline = time.monotonic() + 20
    while sum(c.done() for c in calls) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # no more than `count` are refused
    refused = [c for c in calls if c.done()]
    assert len(refused) == count, [c.exception().details() for c in refused]
    for call in refused:
        assert call.exception().code() == EXHAUSTED, call.exception().details()
    return [call.exception().details() for call in refused]


def test_a_tenant_holding_uploads_open_stops_neither_another_tenants_upload_nor_the_admins(
        server, admin, tenant):
    hog, other = tenant("hog"), tenant("other")
    with trickling_uploads(hog, 3 * PER_TENANT) as held:
        for message in wait_for_refusals(held, 2 * PER_TENANT):
            assert f"tenant 'hog' has {PER_TENANT} uploads, exports and job watches open" \
                in message
            assert "(--max-open-streams-per-tenant)" in message
        assert other.upload("mine", server.adapter).version == 1
        assert admin.upload("admins", server.adapter).version == 1


def test_tenants_filling_the_server_leave_the_admin_a_place(server, admin, tenant):
    first, second, third, late = (tenant(f"filler-{i}") for i in range(4))
    with trickling_uploads(first, PER_TENANT + 1) as a, \
            trickling_uploads(second, PER_TENANT + 1) as b, \
            trickling_uploads(third, PER_TENANT) as c:
        # 8 calls, at most 2 a tenant: the 5 places tenants may fill are full, 3 refused
        held = a + b + c
        messages = wait_for_refusals(held, len(held) - (OPEN_STREAMS - 1))
        server_full = f"the server has {OPEN_STREAMS - 1} uploads, exports and job watches " \
                      "open, its limit (--max-open-streams, less the place kept for admins)"
        assert any(server_full in m for m in messages), messages
        with pytest.raises(grpc.RpcError) as refused:
            late.upload("late", server.adapter)
        assert refused.value.code() == EXHAUSTED and server_full in refused.value.details()
        # the admin's place: an upload, then an export
        published = admin.upload("kept-for-admins", server.adapter)
        assert admin.export(f"kept-for-admins@v{published.version}") == {
            name: (server.adapter / name).read_bytes() for name in
            ("adapter_config.json", "adapter_model.safetensors")}


def test_an_idle_upload_ends_with_deadline_exceeded_and_frees_its_place_keeping_nothing(
        server, tenant):
    idler = tenant("idler")
    stop = threading.Event()

    def half_sent():
        yield _header("idle")
        yield _chunk(b'{"r": ')
        stop.wait(60)

    def silent():  # not even the header
        stop.wait(60)
        yield from ()

    start = time.monotonic()
    idle = [idler.adapters.CreateAdapter.future(messages(), metadata=idler.metadata,
                                                timeout=60) for messages in (half_sent, silent)]
    try:
        errors = [call.exception(30) for call in idle]
        waited = time.monotonic() - start
    finally:
        stop.set()
    for error in errors:
        assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
        assert f"the upload sent nothing for {IDLE_S:g} s, this server's " \
               "--upload-idle-timeout" in error.details()
    assert IDLE_S <= waited < 10 * IDLE_S
    assert list((server.data_dir / "uploads").iterdir()) == []  # no half-written files
    listed = idler.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(),
                                         metadata=idler.metadata)
    assert list(listed.adapters) == []
    # both places of the tenant are free again: a third upload is not refused
    assert idler.upload("after", server.adapter).version == 1
