"""Forwarding: one generic handler for every method of the cotune.v1 services. Requests and
responses pass as bytes, never re-encoded; the caller's metadata (its token) and deadline go
with them, and the worker authenticates the call as it would without the router.

A call a worker fails while it runs (the worker died, or stopped answering its health checks)
is answered UNAVAILABLE with the worker's name, which the SDK retries. A caller that cancels
its call, or whose deadline passes, cancels the worker's call with it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from cotune.router.metrics import RouterMetrics
from cotune.router.pool import Pool, Worker
from cotune.router.routes import Caller, NoWorker, Route, Routes
from cotune.v1 import adapters_pb2, files_pb2, inference_pb2, tenants_pb2, training_pb2

log = logging.getLogger("cotune.router")
SERVICES = tuple(module.DESCRIPTOR.services_by_name[name] for module, name in (
    (adapters_pb2, "AdapterService"), (training_pb2, "TrainingService"),
    (inference_pb2, "InferenceService"), (tenants_pb2, "TenantService"),
    (files_pb2, "FileService")))
_NOT_FORWARDED = ("grpc-", ":")
NO_DEADLINE_S = 1e9  # transport headers, set anew on the worker's call


class Forwarder(grpc.GenericRpcHandler):
    def __init__(self, routes: Routes, pool: Pool, metrics: RouterMetrics):
        self.routes, self.pool, self.metrics = routes, pool, metrics
        self._handlers = {}
        for service in SERVICES:
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                self._handlers[path] = self._handler(path, method)

    def service(self, handler_call_details):
        return self._handlers.get(handler_call_details.method)

    def _handler(self, path: str, method) -> grpc.RpcMethodHandler:
        if method.client_streaming and method.server_streaming:
            raise NotImplementedError(f"{path}: a bidirectional stream; the router forwards "
                                      "unary calls, uploads and server streams")
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(
                lambda request, context: self._stream(path, request, context))
        if method.client_streaming:
            return grpc.stream_unary_rpc_method_handler(
                lambda requests, context: self._unary(path, requests, None, context))
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: self._unary(path, request, request, context))

    def _route(self, path: str, routed_by: bytes | None, context) -> tuple[Route, Caller]:
        metadata = tuple((key, value) for key, value in context.invocation_metadata()
                         if not key.startswith(_NOT_FORWARDED) and key != "user-agent")
        remaining = context.time_remaining()  # a huge number when the caller set no deadline
        caller = Caller(dict(metadata).get("authorization", ""), metadata,
                        remaining if remaining < NO_DEADLINE_S else None)
        try:
            return self.routes.route(path, routed_by, caller), caller
        except NoWorker as e:
            log.warning("%s: %s", path, e)
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    def _unary(self, path: str, request, routed_by: bytes | None, context):
        """A unary call or an upload (`request` is then the iterator of the caller's
        messages, and `routed_by` None)."""
        route, caller = self._route(path, routed_by, context)
        worker = route.worker
        channel = worker.channel
        rpc = channel.unary_unary(path) if routed_by is not None else channel.stream_unary(path)
        with self.pool.calling(worker), self._answering(route, path, context):
            future = rpc.future(request, metadata=caller.metadata, timeout=caller.timeout)
            self.pool.track(worker, future)
            context.add_callback(future.cancel)
            response = future.result()
            if route.learn is not None:
                route.learn(response)
            return response

    def _stream(self, path: str, request: bytes, context):
        route, caller = self._route(path, request, context)
        worker = route.worker
        with self.pool.calling(worker):
            call = worker.channel.unary_stream(path)(request, metadata=caller.metadata,
                                                      timeout=caller.timeout)
            self.pool.track(worker, call)
            context.add_callback(call.cancel)  # the caller went: so does the worker's call
            with self._answering(route, path, context):
                try:
                    for message in call:
                        if route.learn is not None:
                            route.learn(message)
                        yield message
                finally:
                    call.cancel()  # a no-op when it ended; else the caller closed the stream

    @contextmanager
    def _answering(self, route: Route, path: str, context) -> Iterator[None]:
        """Around the worker's part of a forwarded call: a worker's error becomes the caller's
        (UNAVAILABLE naming the worker when the worker failed), and the call is counted with
        the status it ended with."""
        worker, code = route.worker, grpc.StatusCode.OK
        try:
            yield
        except grpc.RpcError as e:
            code = self._answered(worker, e.code())
            self._abort(context, worker, code, e.details())
        except grpc.FutureCancelledError:  # a unary call's future
            code = self._answered(worker, grpc.StatusCode.CANCELLED)
            self._abort(context, worker, code, "the call was cancelled")
        except GeneratorExit:  # a stream: the caller cancelled, or its deadline passed
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._ended(route, path, code)

    @staticmethod
    def _answered(worker: Worker, code: grpc.StatusCode) -> grpc.StatusCode:
        """The status the caller gets for a worker's call that ended with `code`: the worker's
        own, but UNAVAILABLE for every call that a failed worker took down with it."""
        return grpc.StatusCode.UNAVAILABLE if worker.failure else code

    def _abort(self, context, worker: Worker, code: grpc.StatusCode, details: str):
        """Answers the caller (raises)."""
        if code == grpc.StatusCode.UNAVAILABLE:
            self.pool.unavailable(worker, details)
            context.abort(code, f"worker {worker.describe()} failed during the call "
                                f"({worker.failure or details}); the call did not complete, "
                                "retry it")
        context.abort(code, details or "")

    def _ended(self, route: Route, path: str, code: grpc.StatusCode) -> None:
        if route.end is not None:
            route.end()
        self.metrics.calls.labels(route.worker.id, path.rsplit("/", 1)[1], code.name).inc()
