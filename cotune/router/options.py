"""The options of `cotune route`."""

from __future__ import annotations

import argparse

from cotune.server.options import add_grace_period_argument, add_network_arguments


def add_route_arguments(parser: argparse.ArgumentParser) -> None:
    net = add_network_arguments(parser, port=50050)
    net.add_argument("--max-concurrent-calls", type=int, default=1024,
                     help="calls forwarded at once (a stream holds one while it runs); past "
                          "it: RESOURCE_EXHAUSTED at once")
    add_grace_period_argument(net, 10.0)

    found = parser.add_argument_group("discovery of the workers")
    found.add_argument("--discovery", choices=["static", "kubernetes"], default="static",
                       help="static: the --workers list; kubernetes: the endpoints of --service")
    found.add_argument("--workers", default="",
                       help="static: the workers, 'host:port' or 'id=host:port' separated by "
                            "commas; give each the id of its --worker-id, so that job calls "
                            "reach the worker that runs the job")
    found.add_argument("--namespace", default="default",
                       help="kubernetes: the namespace of the workers' Service")
    found.add_argument("--service", help="kubernetes: the workers' headless Service, whose "
                                         "EndpointSlices name the workers")
    found.add_argument("--port-name", default="grpc",
                       help="kubernetes: the Service port of the workers' gRPC")

    choice = parser.add_argument_group("routing")
    choice.add_argument("--spill-threshold", type=int, default=32,
                        help="calls in flight on an adapter's first worker past which its "
                             "generations go to the next worker in its rendezvous order")
    choice.add_argument("--health-interval", type=float, default=1.0,
                        help="seconds between health checks of each worker")
    choice.add_argument("--health-timeout", type=float, default=2.0,
                        help="a worker that does not answer its health check within this is "
                             "out of rotation, and its calls in flight are answered "
                             "UNAVAILABLE")
