"""Exceptions of the layers below, as gRPC status codes. The message is always the
exception's own: it says what was wrong and what is accepted."""

from __future__ import annotations

import grpc

from cotune.adapters.blob_store import StoreUnavailable
from cotune.adapters.merging import IncompatibleParents
from cotune.adapters.peft_format import AdapterError, AdapterMismatch
from cotune.adapters.registry import (
    AlreadyExists,
    FailedPrecondition,
    InvalidName,
    NotFound,
    QuotaExceeded,
    RegistryUnavailable,
)
from cotune.engine.containment import AdapterQuarantined, RequestFailed
from cotune.engine.runtime import EngineStopped
from cotune.engine.session import SessionFailed


class RpcError(Exception):
    """Raised by a handler to end its call with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


# Most specific first: AdapterMismatch is an AdapterError, InvalidName a ValueError.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (EngineStopped, grpc.StatusCode.UNAVAILABLE),  # this replica is done; another answers
    (RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),  # the database is away; retry later
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),  # the blob store is away; retry later
    (AdapterQuarantined, grpc.StatusCode.FAILED_PRECONDITION),
    (RequestFailed, grpc.StatusCode.INTERNAL),  # the engine failed it alone, and says why
    # a session's operation the engine could not complete (its loss became Inf): the message
    # says what was undone; the session goes on
    (SessionFailed, grpc.StatusCode.ABORTED),
    (InvalidName, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (IncompatibleParents, grpc.StatusCode.FAILED_PRECONDITION),  # a merge's parents
    (AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # sampling, prompts, specs, data
)


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status for an exception the client caused; None for a server fault."""
    if isinstance(error, RpcError):
        return error.code, brief(error.message)
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code, brief(str(error))
    return None


MAX_STATUS_BYTES = 1024


def brief(message: str) -> str:
    """`message` with its middle elided past MAX_STATUS_BYTES of UTF-8. The status message
    travels in a trailer, and gRPC clients drop a call whose trailers pass 8-16 KiB (they
    report RESOURCE_EXHAUSTED instead of the status), so a message that echoes a huge field
    must be cut; the head says what was wrong, the tail what is accepted."""
    data = message.encode()
    if len(data) <= MAX_STATUS_BYTES:
        return message
    half = MAX_STATUS_BYTES // 2 - 8
    return (data[:half].decode(errors="ignore") + " [...] "
            + data[-half:].decode(errors="ignore"))
