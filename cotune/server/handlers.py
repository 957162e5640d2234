"""Every RPC's frame: the draining check, authentication (the tenant comes from the token,
never from a field the client sets), and the translation of errors to status codes."""

from __future__ import annotations

import functools
import inspect
import logging
from contextlib import nullcontext

import grpc
from google.protobuf.message import DecodeError

from cotune.adapters.registry import Registry, TenantRecord
from cotune.server.admission import OpenStreams
from cotune.server.errors import status_of
from cotune.server.metrics import protocol_of

log = logging.getLogger("cotune.server")


class Gate:
    """Who may call: closed while draining; a token names the caller's tenant. Calls a client
    may hold open pass through `open_streams` too."""

    def __init__(self, registry: Registry, open_streams: OpenStreams):
        self.registry, self.open_streams = registry, open_streams
        self.draining = False

    def caller(self, context: grpc.ServicerContext, admin: bool) -> TenantRecord:
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the server is shutting down; retry, another replica will answer")
        headers = [value for key, value in context.invocation_metadata()
                   if key == "authorization"]
        if not headers:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "no authorization metadata; send 'authorization: Bearer <token>'")
        if len(headers) > 1:  # which one would count is the server's guess: none does
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"{len(headers)} authorization headers; accepted: exactly one, "
                          "'authorization: Bearer <token>'")
        scheme, _, token = headers[0].partition(" ")
        tenant = self.registry.authenticate(token.strip()) if scheme == "Bearer" else None
        if tenant is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "the token is invalid or revoked; send 'authorization: Bearer <token>' "
                          "with a token issued by an admin")
        if admin and not tenant.admin:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"tenant {tenant.name!r} is not an admin; this call needs an admin token")
        return tenant


def rpc(admin: bool = False, held_open: bool = False):
    """Decorates a servicer method `(self, request, context, tenant)`; the servicer has a
    `gate`. Streaming methods (generators) keep the translation while they stream. A call the
    client may hold open (`held_open`: an upload, an export, a watch) holds a place of the
    gate's open_streams while it runs."""

    def decorate(method):
        def places(self, tenant: TenantRecord, context):
            return self.gate.open_streams.hold(tenant, protocol_of(context)) if held_open \
                else nullcontext()

        if inspect.isgeneratorfunction(method):
            @functools.wraps(method)
            def stream(self, request, context):
                try:  # the caller too: a registry away is UNAVAILABLE, never UNKNOWN
                    tenant = self.gate.caller(context, admin)
                    with places(self, tenant, context):
                        yield from method(self, request, context, tenant)
                except Exception as e:  # noqa: BLE001 - every error gets a status
                    _abort(context, method, e)
            return stream

        @functools.wraps(method)
        def unary(self, request, context):
            try:
                tenant = self.gate.caller(context, admin)
                with places(self, tenant, context):
                    return method(self, request, context, tenant)
            except Exception as e:  # noqa: BLE001 - every error gets a status
                _abort(context, method, e)
        return unary

    return decorate


def _abort(context: grpc.ServicerContext, method, error: Exception):
    if context.code() is not None:  # context.abort() already chose the status
        raise error
    status = status_of(error)
    if status is None:
        log.exception("%s failed", method.__qualname__, exc_info=error)
        status = grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the " \
                                           "server log"
    context.abort(*status)


class _Undecodable:
    """A request whose bytes did not parse: invalid UTF-8 in a string field, bad wire data."""

    def __init__(self, error: DecodeError):
        self.error = error


def _refuse(context: grpc.ServicerContext, request: _Undecodable):
    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                  f"the request message does not parse ({request.error}); accepted: a message "
                  "of this method's type, string fields in valid UTF-8")


def _checked(requests, context):
    for request in requests:
        if isinstance(request, _Undecodable):
            _refuse(context, request)
        yield request


class DecodeErrors(grpc.ServerInterceptor):
    """Requests that do not parse get INVALID_ARGUMENT. Without this, grpc answers them with
    INTERNAL ("Exception deserializing request!"), which says the server is at fault."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(data: bytes):
            try:
                return parse(data)
            except DecodeError as e:
                return _Undecodable(e)

        kind = ("stream_" if handler.request_streaming else "unary_") + \
               ("stream" if handler.response_streaming else "unary")
        behavior = getattr(handler, kind)

        def checked(request, context):
            if handler.request_streaming:
                return behavior(_checked(request, context), context)
            if isinstance(request, _Undecodable):
                _refuse(context, request)
            return behavior(request, context)

        return handler._replace(request_deserializer=lenient, **{kind: checked})
