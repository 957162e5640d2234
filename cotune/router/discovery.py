"""Where the workers are: a static list (`--workers`), or the EndpointSlices of the workers'
headless Service, followed through the `kubernetes` client (in-cluster config, else the
kubeconfig). Either reports the whole set, worker id -> host:port, on every change.

A worker's id is its pod's name (the endpoint's targetRef), which is also its --worker-id in
the chart's StatefulSets: job owners and workers match by it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from kubernetes import client, config, watch

log = logging.getLogger("cotune.router")
WATCH_SECONDS = 300  # the API server ends a watch after this; it resumes from its version
RETRY_SECONDS = 2.0
_STATIC_ACCEPTED = "host:port or id=host:port entries separated by commas"


def parse_static(text: str) -> dict[str, str]:
    """'w0=10.0.0.1:50051,10.0.0.2:50051' -> {'w0': '10.0.0.1:50051', '10.0.0.2:50051':
    '10.0.0.2:50051'}: an entry without an id is named by its address."""
    workers = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        worker_id, _, address = entry.rpartition("=")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or worker_id in workers or address in workers:
            raise ValueError(f"--workers entry {entry!r} is invalid or repeated; accepted: "
                             f"{_STATIC_ACCEPTED}, each id and address once")
        workers[worker_id or address] = address
    if not workers:
        raise ValueError(f"--workers is empty; accepted: {_STATIC_ACCEPTED}")
    return workers


def ready_workers(slices: Iterable[client.V1EndpointSlice], port_name: str) -> dict[str, str]:
    """The ready endpoints of `slices`: pod name -> address:port of the port `port_name`
    (the only port when none has that name). An endpoint whose ready condition is unset
    counts as ready, as the EndpointSlice API says consumers should read it."""
    workers = {}
    for endpoint_slice in slices:
        port = _port(endpoint_slice, port_name)
        if port is None:
            continue
        for endpoint in endpoint_slice.endpoints or ():
            conditions = endpoint.conditions
            if (conditions is not None and conditions.ready is False) or not endpoint.addresses:
                continue
            address = endpoint.addresses[0]
            if endpoint_slice.address_type == "IPv6":
                address = f"[{address}]"
            ref = endpoint.target_ref
            worker_id = ref.name if ref is not None and ref.name else \
                endpoint.hostname or f"{address}:{port}"
            workers[worker_id] = f"{address}:{port}"
    return workers


def _port(endpoint_slice: client.V1EndpointSlice, name: str) -> int | None:
    ports = endpoint_slice.ports or ()
    named = [p.port for p in ports if p.name == name and p.port]
    if named:
        return named[0]
    return ports[0].port if len(ports) == 1 else None


class EndpointSliceWatch:
    """Follows the EndpointSlices of Service `service` (label kubernetes.io/service-name) in
    `namespace`: a list, then a watch from the list's version; on a watch's expiry (410) or an
    error, a new list."""

    def __init__(self, api: client.DiscoveryV1Api, namespace: str, service: str,
                 port_name: str, on_change: Callable[[dict[str, str]], None]):
        self.api, self.namespace, self.port_name = api, namespace, port_name
        self.selector = f"kubernetes.io/service-name={service}"
        self.on_change = on_change
        self._slices: dict[str, client.V1EndpointSlice] = {}
        self._reported: dict[str, str] | None = None

    @classmethod
    def from_config(cls, namespace: str, service: str, port_name: str,
                    on_change: Callable[[dict[str, str]], None]) -> EndpointSliceWatch:
        """Credentials from the pod's service account, else from the kubeconfig."""
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.DiscoveryV1Api(), namespace, service, port_name, on_change)

    def start(self, stop: threading.Event) -> None:
        threading.Thread(target=self.run, args=(stop,), daemon=True, name="discovery").start()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                version = self._list()
                while not stop.is_set():
                    version = self._watch(version, stop)
            except client.ApiException as e:
                if e.status != 410:  # 410: the version expired; a new list catches up
                    log.warning("EndpointSlices of %s: %s; retrying", self.selector, e)
                    stop.wait(RETRY_SECONDS)
            except Exception as e:  # noqa: BLE001 - the router keeps its last known workers
                log.warning("EndpointSlices of %s: %r; retrying", self.selector, e)
                stop.wait(RETRY_SECONDS)

    def _list(self) -> str:
        listed = self.api.list_namespaced_endpoint_slice(self.namespace,
                                                         label_selector=self.selector)
        self._slices = {s.metadata.name: s for s in listed.items}
        self._report()
        return listed.metadata.resource_version

    def _watch(self, version: str, stop: threading.Event) -> str:
        """Applies the events of one watch; returns the version to watch from next."""
        events = watch.Watch()
        for event in events.stream(self.api.list_namespaced_endpoint_slice, self.namespace,
                                   label_selector=self.selector, resource_version=version,
                                   allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS):
            self.apply(event)
            if stop.is_set():
                events.stop()
        return events.resource_version or version

    def apply(self, event: dict) -> None:
        """One watch event: ADDED, MODIFIED or DELETED of a V1EndpointSlice (BOOKMARKs only
        move the version)."""
        kind, endpoint_slice = event["type"], event["object"]
        if kind in ("ADDED", "MODIFIED"):
            self._slices[endpoint_slice.metadata.name] = endpoint_slice
        elif kind == "DELETED":
            self._slices.pop(endpoint_slice.metadata.name, None)
        else:
            return
        self._report()

    def _report(self) -> None:
        workers = ready_workers(self._slices.values(), self.port_name)
        if workers != self._reported:
            log.info("workers from EndpointSlices: %s", workers)
            self._reported = workers
            self.on_change(dict(workers))
