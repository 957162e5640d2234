"""`cotune route`: the cotune.v1 services in front of the workers, each call forwarded to one
of them (`routes.py` says which), with grpc.health.v1 (SERVING while a worker is healthy),
reflection, and Prometheus metrics.

Stop (SIGTERM or SIGINT): health turns NOT_SERVING, and calls in flight get --grace-period
seconds to finish.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2

from cotune.router.discovery import EndpointSliceWatch, parse_static
from cotune.router.forward import SERVICES, Forwarder
from cotune.router.metrics import RouterMetrics
from cotune.router.pool import MAX_MESSAGE_BYTES, Pool
from cotune.router.routes import Routes
from cotune.server.http.app import attach_front
from cotune.server.lifecycle import Lifecycle, start_metrics

log = logging.getLogger("cotune.router")
SERVING, NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING)


class Router:
    def __init__(self, args):
        if args.spill_threshold < 1:
            raise ValueError(f"--spill-threshold {args.spill_threshold} is invalid; accepted: "
                             "1 or more calls in flight")
        self.metrics = RouterMetrics()
        self.lifecycle = Lifecycle((s.full_name for s in SERVICES), args.grace_period, log)
        self.lifecycle.set_health(NOT_SERVING)
        self.pool = Pool(self.metrics, args.health_interval, args.health_timeout,
                         lambda healthy: None if self.lifecycle.stopping.is_set() else
                         self.lifecycle.set_health(SERVING if healthy else NOT_SERVING))
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
        self.lifecycle.add_to(self.server)
        self.port = self.server.add_insecure_port(f"{args.host}:{args.port}")
        self.http = attach_front(self.server, args.host, args.http_port)
        self.metrics_port = start_metrics(args.host, args.metrics_port, self.metrics.registry)
        self.health_timeout = args.health_timeout

    def start(self) -> None:
        if self.discovery is not None:
            self.discovery.start(self.lifecycle.stopping)
        self.pool.start()
        self.pool.wait_checked(self.health_timeout + 1)  # serve knowing who is up
        self.server.start()
        if self.http is not None:
            self.http.start()

    def stop(self) -> None:
        if self.http is not None:
            self.http.drain()  # new HTTP calls: 503, saying why
        if not self.lifecycle.drain(self.server):
            return
        if self.http is not None:
            self.http.stop()  # after the drain: its calls in flight were gRPC calls underneath
        self.pool.stop()
        self.lifecycle.stopped.set()


def route_command(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    router = Router(args)
    router.start()
    banner = [f"cotune route: listening on {args.host}:{router.port} (grpc), "
              f"{len(router.pool.healthy())} workers healthy"]
    if router.http is not None:
        banner.append(f"openai api: {router.http.url}")
    if router.metrics_port:
        banner.append(f"metrics: http://{args.host}:{router.metrics_port}/metrics")
    router.lifecycle.run_until_stopped(router.stop, banner)
    return 0
