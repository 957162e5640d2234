"""`cotune route`: the cotune.v1 services in front of the workers, each call forwarded to one
of them (`routes.py` says which), with grpc.health.v1 (SERVING while a worker is healthy),
reflection, and Prometheus metrics.

Stop (SIGTERM or SIGINT): health turns NOT_SERVING, and calls in flight get --grace-period
seconds to finish.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cotune.router.discovery import EndpointSliceWatch, parse_static
from cotune.router.forward import SERVICES, Forwarder
from cotune.router.metrics import RouterMetrics
from cotune.router.pool import MAX_MESSAGE_BYTES, Pool
from cotune.router.routes import Routes

log = logging.getLogger("cotune.router")
SERVING, NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING)


class Router:
    def __init__(self, args):
        if args.spill_threshold < 1:
            raise ValueError(f"--spill-threshold {args.spill_threshold} is invalid; accepted: "
                             "1 or more calls in flight")
        self.metrics = RouterMetrics()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._set_health(NOT_SERVING)
        self._stopping, self.stopped = threading.Event(), threading.Event()
        self.pool = Pool(self.metrics, args.health_interval, args.health_timeout,
                         lambda healthy: None if self._stopping.is_set() else
                         self._set_health(SERVING if healthy else NOT_SERVING))
        if args.discovery == "static":
            self.pool.set_workers(parse_static(args.workers))
            self.discovery = None
        else:
            if not args.service:
                raise ValueError("--discovery kubernetes needs --service, the workers' "
                                 "headless Service")
            self.discovery = EndpointSliceWatch.from_config(
                args.namespace, args.service, args.port_name, self.pool.set_workers)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(args.max_concurrent_calls, thread_name_prefix="route"),
            maximum_concurrent_rpcs=args.max_concurrent_calls,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self.server.add_generic_rpc_handlers(
            (Forwarder(Routes(self.pool, args.spill_threshold, self.metrics), self.pool,
                       self.metrics),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*(s.full_name for s in SERVICES),
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{args.host}:{args.port}")
        self.metrics_port = None
        if args.metrics_port:
            http, _ = prometheus_client.start_http_server(
                args.metrics_port, addr=args.host, registry=self.metrics.registry)
            self.metrics_port = http.server_port
        self.grace, self.health_timeout = args.grace_period, args.health_timeout

    def start(self) -> None:
        if self.discovery is not None:
            self.discovery.start(self._stopping)
        self.pool.start()
        self.pool.wait_checked(self.health_timeout + 1)  # serve knowing who is up
        self.server.start()

    def _set_health(self, status) -> None:
        for service in ("", *(s.full_name for s in SERVICES)):
            self.health.set(service, status)

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info("stopping: draining for up to %.0f s", self.grace)
        self.health.enter_graceful_shutdown()
        self.server.stop(self.grace).wait()
        self.pool.stop()
        self.stopped.set()


def route_command(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    router = Router(args)
    router.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=router.stop).start())
    print(f"cotune route: listening on {args.host}:{router.port} (grpc), "
          f"{len(router.pool.healthy())} workers healthy", flush=True)
    if router.metrics_port:
        print(f"metrics: http://{args.host}:{router.metrics_port}/metrics", flush=True)
    while not router.stopped.wait(0.5):  # a timed wait lets the signal handlers run
        pass
    return 0
