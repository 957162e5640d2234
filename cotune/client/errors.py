"""The errors the SDK raises: one class per gRPC status code, each carrying the server's message.

Catch `CotuneError` for any failure of a call, or a subclass for one cause:

    try:
        client.adapters.get("summarizer")
    except NotFound:
        ...
"""

from __future__ import annotations

import grpc


class CotuneError(Exception):
    """A call failed. `code` is the gRPC status code, `message` what the server said."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(CotuneError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CotuneError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CotuneError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(CotuneError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(CotuneError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(CotuneError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(CotuneError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(CotuneError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CotuneError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(CotuneError):
    code = grpc.StatusCode.CANCELLED


class Aborted(CotuneError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(CotuneError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(CotuneError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(CotuneError):
    code = grpc.StatusCode.INTERNAL


class DataLoss(CotuneError):
    code = grpc.StatusCode.DATA_LOSS


class Unknown(CotuneError):
    code = grpc.StatusCode.UNKNOWN


_BY_CODE = {cls.code: cls for cls in CotuneError.__subclasses__()}


def from_rpc_error(error: grpc.RpcError) -> CotuneError:
    """The `CotuneError` subclass for a failed call (sync or grpc.aio), with its details."""
    code = error.code()
    message = error.details() or ""
    return _BY_CODE.get(code, CotuneError)(message, code)
