"""OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`) with the HTTP
status the `openai` client maps to its exception classes, from the gRPC status of the call
underneath or from the front's own checks of the JSON."""

from __future__ import annotations

import grpc
from starlette.responses import JSONResponse

# gRPC status -> (HTTP status, OpenAI error type)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    # the adapter does not fit the base, or is quarantined: the request is well-formed
    grpc.StatusCode.FAILED_PRECONDITION: (422, "unprocessable_entity_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
RETRY_AFTER_S = 1  # when a quota or the server's queue refused: a short wait, then again


class ApiError(Exception):
    """Ends an HTTP call with `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else None
        return JSONResponse(self.body(), self.status, headers=headers)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def not_found(message: str, param: str | None = None) -> ApiError:
    return ApiError(404, message, "not_found_error", param, "not_found")


def from_grpc(error: grpc.RpcError, param: str | None = None) -> ApiError:
    """The HTTP error for a failed gRPC call; `param` names the field the call was about."""
    code = error.code()
    status, kind = _HTTP.get(code, (500, "server_error"))
    return ApiError(status, error.details() or code.name, kind,
                    param if status in (400, 404) else None, code.name.lower())
