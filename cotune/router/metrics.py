"""The router's Prometheus metrics (on --metrics-port): calls per worker by method and status,
calls in flight per worker, healthy workers, and spills past a loaded worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class RouterMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.calls = Counter("cotune_router_calls", "calls forwarded, by worker, method and "
                             "final gRPC status", ["worker", "method", "code"],
                             registry=self.registry)
        self.in_flight = Gauge("cotune_router_calls_in_flight",
                               "calls forwarded to a worker and not yet answered", ["worker"],
                               registry=self.registry)
        self.worker_up = Gauge("cotune_router_worker_healthy",
                               "1 while the worker is in rotation (health SERVING), else 0",
                               ["worker"], registry=self.registry)
        self.healthy = Gauge("cotune_router_healthy_workers", "workers in rotation",
                             registry=self.registry)
        self.spills = Counter("cotune_router_spills", "generations sent past the adapter's "
                              "first worker because it had --spill-threshold calls in flight",
                              registry=self.registry)
        self.failures = Counter("cotune_router_worker_failures",
                                "times a worker was taken out of rotation", ["worker"],
                                registry=self.registry)
