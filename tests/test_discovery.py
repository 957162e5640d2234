"""Discovery of the workers: the static list, and EndpointSlices read through the `kubernetes`
client's own object models and its own watch, fed a JSON event stream as the API server sends
it (no API server here)."""

from __future__ import annotations

import json
import threading

import pytest
from kubernetes import client
from kubernetes.client import V1EndpointSliceList

from cotune.router.discovery import EndpointSliceWatch, parse_static, ready_workers

SERVICE = "cotune-workers-headless"


def endpoint(pod: str, ip: str, ready: bool | None = True) -> client.V1Endpoint:
    return client.V1Endpoint(
        addresses=[ip], conditions=client.V1EndpointConditions(ready=ready),
        target_ref=client.V1ObjectReference(kind="Pod", name=pod, namespace="ml"))


def endpoint_slice(name: str, *endpoints: client.V1Endpoint, version: str = "1",
                   port: int = 50051, address_type: str = "IPv4") -> client.V1EndpointSlice:
    return client.V1EndpointSlice(
        address_type=address_type, api_version="discovery.k8s.io/v1", kind="EndpointSlice",
        metadata=client.V1ObjectMeta(name=name, namespace="ml", resource_version=version,
                                     labels={"kubernetes.io/service-name": SERVICE}),
        endpoints=list(endpoints),
        ports=[client.DiscoveryV1EndpointPort(name="grpc", port=port, protocol="TCP"),
               client.DiscoveryV1EndpointPort(name="rendezvous", port=29500, protocol="TCP")])


def test_static_list_names_workers_by_id_or_address():
    assert parse_static("w0=127.0.0.1:5001, 127.0.0.1:5002") == {
        "w0": "127.0.0.1:5001", "127.0.0.1:5002": "127.0.0.1:5002"}
    for bad in ("", "w0=127.0.0.1", "w0=:5001", "w0=a:1,w0=b:2", "a:1,a:1"):
        with pytest.raises(ValueError, match="accepted: host:port or id=host:port"):
            parse_static(bad)


def test_only_ready_endpoints_of_every_slice_are_workers_named_by_their_pod():
    slices = [endpoint_slice("a", endpoint("w-0", "10.0.0.1"), endpoint("w-1", "10.0.0.2", False),
                             endpoint("w-2", "10.0.0.3", None)),  # unset: ready, as the API says
              endpoint_slice("b", endpoint("w-3", "fd00::4"), address_type="IPv6")]
    assert ready_workers(slices, "grpc") == {
        "w-0": "10.0.0.1:50051", "w-2": "10.0.0.3:50051", "w-3": "[fd00::4]:50051"}
    assert ready_workers(slices, "metrics") == {}  # two ports, neither of that name


class FakeWatchResponse:
    """What the client's watch reads from urllib3: newline-delimited JSON events."""

    def __init__(self, events: list[dict]):
        self.lines = [json.dumps(e).encode() + b"\n" for e in events]

    def stream(self, amt=None, decode_content=False):
        yield from self.lines

    def close(self):
        pass

    def release_conn(self):
        pass


def event(kind: str, obj: client.V1EndpointSlice) -> dict:
    return {"type": kind, "object": client.ApiClient().sanitize_for_serialization(obj)}


class FakeDiscoveryApi:
    """list_namespaced_endpoint_slice answering from a script of lists and watch streams."""

    def __init__(self, script: list, stop: threading.Event):
        self.script, self.stop, self.calls = script, stop, []

    # the client's watch finds the type of events from this annotation, as on the real API
    def list_namespaced_endpoint_slice(self, namespace, **kwargs) -> V1EndpointSliceList:
        self.calls.append((namespace, kwargs))
        if not self.script:
            self.stop.set()
            return FakeWatchResponse([])
        answer = self.script.pop(0)
        assert bool(kwargs.get("watch")) == isinstance(answer, FakeWatchResponse)
        return answer


def test_the_watch_follows_changes_deletions_and_relists_after_an_expired_version():
    a1 = endpoint_slice("a", endpoint("w-0", "10.0.0.1"), endpoint("w-1", "10.0.0.2"),
                        version="10")
    a2 = endpoint_slice("a", endpoint("w-0", "10.0.0.1"), endpoint("w-1", "10.0.0.2", False),
                        version="11")
    b = endpoint_slice("b", endpoint("w-2", "10.0.0.3"), version="12")
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                        "message": "too old resource version"}}
    bookmark = {"type": "BOOKMARK", "object": {"kind": "EndpointSlice",
                                               "metadata": {"resourceVersion": "13"}}}
    stop = threading.Event()
    api = FakeDiscoveryApi([
        client.V1EndpointSliceList(items=[a1], metadata=client.V1ListMeta(resource_version="10")),
        FakeWatchResponse([event("MODIFIED", a2), event("ADDED", b), event("DELETED", a2),
                           bookmark]),
        FakeWatchResponse([gone]),
        client.V1EndpointSliceList(items=[a2, b],
                                   metadata=client.V1ListMeta(resource_version="20")),
    ], stop)
    seen = []
    EndpointSliceWatch(api, "ml", SERVICE, "grpc", seen.append).run(stop)
    assert seen == [
        {"w-0": "10.0.0.1:50051", "w-1": "10.0.0.2:50051"},  # the first list
        {"w-0": "10.0.0.1:50051"},  # w-1 not ready
        {"w-0": "10.0.0.1:50051", "w-2": "10.0.0.3:50051"},  # slice b added
        {"w-2": "10.0.0.3:50051"},  # slice a deleted
        {"w-0": "10.0.0.1:50051", "w-2": "10.0.0.3:50051"},  # the list after the 410
    ]
    selectors = {kwargs["label_selector"] for _, kwargs in api.calls}
    assert selectors == {f"kubernetes.io/service-name={SERVICE}"}
    versions = [kwargs.get("resource_version") for _, kwargs in api.calls if kwargs.get("watch")]
    assert versions == ["10", "13", "20"]  # from the list, from the bookmark, from the relist
