"""The OpenAI-compatible HTTP front of `cotune serve` and `cotune route`.

One implementation underneath: each HTTP call is translated into calls of the cotune.v1 gRPC
services of the same process, over a private Unix socket, with the caller's own bearer token.
Authentication, tenancy, quotas, admission, draining and every check of the input are the
gRPC services' own; this package only translates the wire (JSON and server-sent events in,
OpenAI's objects and errors out). The router's front is the same code in front of the
router's gRPC services, so HTTP traffic is routed with adapter affinity like gRPC traffic.

Imports no torch: the router uses it.
"""
