"""The gRPC services an HTTP call is translated into: an asyncio channel to the server's own
listener (a private Unix socket), its stubs, and the metadata that carries the caller's token.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.requests import Request

from cotune.server.http.errors import ApiError
from cotune.server.metrics import PROTOCOL_METADATA
from cotune.v1 import (
    adapters_pb2_grpc,
    files_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    training_pb2_grpc,
)

MAX_MESSAGE_BYTES = 64 << 20  # as the gRPC server's own bound
DEFAULT_MAX_UPLOAD_BYTES = 2048 << 20  # `cotune serve --max-upload-mb`'s default


class Backend:
    """Made in the HTTP server's event loop (`open`), closed in it (`close`)."""

    def __init__(self, target: str, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        self.target = target
        self.max_upload_bytes = max_upload_bytes  # a file upload's body, read before gRPC
        self.channel: grpc.aio.Channel | None = None
        self._base_model: str | None = None

    def open(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.target, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdapterServiceStub(self.channel)
        self.training = training_pb2_grpc.TrainingServiceStub(self.channel)
        self.files = files_pb2_grpc.FileServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def authenticate(self, metadata) -> None:
        """Refuses a caller whose token the gRPC services refuse (a grpc.RpcError), with a
        call that costs nothing: before a body the front reads whole is read."""
        await self.inference.GetModelInfo(inference_pb2.GetModelInfoRequest(), metadata=metadata)

    async def base_model(self, metadata) -> str:
        """The base model's id, as GetModelInfo names it; asked once, as it never changes
        while the server runs."""
        if self._base_model is None:
            info = await self.inference.GetModelInfo(inference_pb2.GetModelInfoRequest(),
                                                     metadata=metadata)
            self._base_model = info.name
        return self._base_model

    async def serving(self) -> bool:
        """What grpc.health.v1 says of the server as a whole."""
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata of a call made for `request`: its one `Authorization` header, which
    the gRPC services check as they check any call's."""
    headers = request.headers.getlist("authorization")
    if not headers:
        raise ApiError(401, "no Authorization header; send 'Authorization: Bearer <token>' "
                       "with a token issued by an admin (the same tokens as gRPC)",
                       "authentication_error", code="missing_token")
    if len(headers) > 1:
        raise ApiError(401, f"{len(headers)} Authorization headers; accepted: exactly one, "
                       "'Authorization: Bearer <token>'", "authentication_error",
                       code="invalid_token")
    return ("authorization", headers[0]), (PROTOCOL_METADATA, "http")
