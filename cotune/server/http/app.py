"""The Starlette application of the HTTP front, and the uvicorn server that runs it on a
thread of the serving process, beside the gRPC server.

Routes: `/health` (open), and under `/v1` OpenAI's models, completions, chat completions,
files and fine-tuning jobs (each module's `routes`). Every error, the front's own or a gRPC
status underneath, leaves as OpenAI's error object (`errors.py`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import tempfile
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cotune.server.http import chat, completions, files, fine_tuning, models
from cotune.server.http.backend import DEFAULT_MAX_UPLOAD_BYTES, Backend
from cotune.server.http.errors import ApiError, from_grpc

log = logging.getLogger("cotune.http")
START_TIMEOUT_S = 30


def build_app(backend: Backend) -> Starlette:
    @asynccontextmanager
    async def lifespan(app):
        backend.open()  # the channel belongs to this event loop
        yield
        await backend.close()

    async def health(request: Request) -> JSONResponse:
        serving = await backend.serving()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"},
                            200 if serving else 503)

    routes = [Route("/health", health, methods=["GET"]),
              *models.routes(backend),
              *completions.routes(backend),
              *chat.routes(backend),
              *files.routes(backend),
              *fine_tuning.routes(backend)]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        ApiError: _api_error, grpc.RpcError: _grpc_error, HTTPException: _http_error,
        Exception: _server_error})


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error.response()


async def _grpc_error(request: Request, error: grpc.RpcError) -> JSONResponse:
    return from_grpc(error).response()


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) \
        else str(error.detail)
    return ApiError(error.status_code, message, kind).response()


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return ApiError(500, "internal error; see the server log", "server_error").response()


@dataclass
class Tls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # mTLS, as on the gRPC port: clients need a cert it signed


class HttpFront:
    """uvicorn serving `build_app(Backend(grpc_target))` on host:port, on a thread of its own
    (its own event loop). `port` is the one it listens on (0 picks a free one).

    The owner's stop calls `drain` as its gRPC server starts draining, and `stop` once that
    drain has ended: the HTTP calls in flight are gRPC calls underneath, drained with the
    others, and the front answers (503) until then, so that a load balancer sees the replica
    go unready rather than refuse connections."""

    def __init__(self, grpc_target: str, host: str, port: int, tls: Tls | None = None,
                 socket_dir: Path | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        self.app = build_app(Backend(grpc_target, max_upload_bytes))
        self.draining = False
        config = uvicorn.Config(
            # asgi3 said, not guessed: uvicorn takes a bound method for an ASGI2 app
            self._serve_unless_draining, interface="asgi3", host=host, port=port,
            log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5,
            ssl_certfile=tls and str(tls.cert), ssl_keyfile=tls and str(tls.key),
            ssl_ca_certs=tls and tls.client_ca and str(tls.client_ca),
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True, name="http-front")
        self.host, self.port = host, port
        self.scheme = "https" if tls is not None else "http"
        self.socket_dir = socket_dir  # removed at the stop

    async def _serve_unless_draining(self, scope, receive, send) -> None:
        # a draining gRPC server has closed the private socket: without this a new call would
        # get the channel's "failed to connect to unix:/tmp/..." instead of the reason
        if self.draining and scope["type"] == "http" and scope["path"] != "/health":
            refused = ApiError(503, "the server is shutting down; retry, another replica will "
                               "answer", "service_unavailable_error", code="unavailable")
            await refused.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self) -> None:
        self.thread.start()
        for _ in range(START_TIMEOUT_S * 20):
            if self.server.started or not self.thread.is_alive():
                break
            self.thread.join(0.05)
        if not self.server.started:
            raise RuntimeError(f"the HTTP front did not start on port {self.port}")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/v1"

    def drain(self) -> None:
        """New calls (but /health) are answered 503 from now on; those in flight go on."""
        self.draining = True

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def attach_front(server: grpc.Server, host: str, port: int | None, tls: Tls | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> HttpFront | None:
    """An HttpFront on host:port (None: no front) whose calls reach `server` (not yet
    started) over a private Unix socket in a directory only this user may enter.
    `max_upload_bytes`: the largest file upload it reads (the server's own bound)."""
    if port is None:
        return None
    socket_dir = Path(tempfile.mkdtemp(prefix="cotune-"))  # mode 0700
    target = f"unix:{socket_dir / 'grpc.sock'}"
    server.add_insecure_port(target)
    return HttpFront(target, host, port, tls, socket_dir, max_upload_bytes)
