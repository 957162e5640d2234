"""What `cotune serve` and `cotune route` share as gRPC servers: grpc.health.v1 for the server
("") and each of its services, reflection, the Prometheus endpoint, and the graceful stop on
SIGTERM or SIGINT. Imports no torch: the router uses it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Lifecycle:
    """The health and the stop of one gRPC server. The owner builds it first, calls `add_to`
    once its services are on the server, `set_health` as it becomes (un)able to serve,
    `drain` from its own `stop`, and `run_until_stopped` from the command's main thread."""

    def __init__(self, services: Sequence[str], grace: float, log: logging.Logger):
        self.services, self.grace, self.log = tuple(services), grace, log
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.stopping, self.stopped = threading.Event(), threading.Event()

    def add_to(self, server: grpc.Server) -> None:
        """Serves grpc.health.v1 on `server`, and reflection of its services and health."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*self.services, HEALTH_SERVICE, reflection.SERVICE_NAME), server)

    def set_health(self, status) -> None:
        for service in ("", *self.services):
            self.health.set(service, status)

    def drain(self, server: grpc.Server, meanwhile: Callable[[], None] | None = None) -> bool:
        """The first call turns health NOT_SERVING, refuses new calls and gives those in flight
        up to `grace` seconds, running `meanwhile` (bounded by the grace too) on a thread of
        its own as they drain; True once both ended. Every later call does nothing and
        returns False, so that `stop` may be called again (a second signal) from any
        thread."""
        if self.stopping.is_set():
            return False
        self.stopping.set()
        self.log.info("stopping: draining for up to %.0f s", self.grace)
        self.health.enter_graceful_shutdown()
        beside = threading.Thread(target=meanwhile or (lambda: None), name="drain-meanwhile")
        beside.start()
        server.stop(self.grace).wait()
        beside.join()
        return True

    def run_until_stopped(self, stop: Callable[[], None], banner: Sequence[str]) -> None:
        """Called by the command once serving: SIGTERM and SIGINT call `stop` on a thread of
        its own, the banner is printed (after the handlers: whoever reads it may signal at
        once), and this returns when `stopped` is set."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: threading.Thread(target=stop).start())
        for line in banner:
            print(line, flush=True)
        while not self.stopped.wait(0.5):  # a timed wait lets the signal handlers run
            pass


def start_metrics(host: str, port: int, registry: prometheus_client.CollectorRegistry
                  ) -> int | None:
    """Serves `registry` at http://host:port/metrics; the port it listens on, None when `port`
    is 0 (no endpoint)."""
    if not port:
        return None
    http, _ = prometheus_client.start_http_server(port, addr=host, registry=registry)
    return http.server_port
