"""The cotune SDK: a blocking `Client` and an asyncio `AsyncClient` over the gRPC contract in
proto/cotune/v1. Needs grpcio and protobuf only: installing it pulls in no torch.

    from cotune.client import Client, NotFound

    with Client() as client:  # $COTUNE_ADDR, $COTUNE_TOKEN
        print(client.complete("Hello", adapter="greeter", max_tokens=20).text)
"""

from cotune.client.aio import AsyncClient
from cotune.client.client import Client
from cotune.client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    CotuneError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from cotune.client.sessions import Session
from cotune.client.types import (
    Adapter,
    AdapterVersion,
    Completion,
    Delta,
    Example,
    File,
    ForwardResult,
    IssuedToken,
    Job,
    JobEvent,
    ModelInfo,
    OptimResult,
    Quotas,
    SessionInfo,
    Tenant,
    TenantDeletion,
    TokenInfo,
    TokenLogprob,
    Usage,
)

__all__ = [
    "Aborted", "Adapter", "AdapterVersion", "AlreadyExists", "AsyncClient", "Cancelled",
    "Client", "Completion", "CotuneError", "DataLoss", "DeadlineExceeded", "Delta", "Example",
    "FailedPrecondition", "File", "ForwardResult", "Internal", "InvalidArgument", "IssuedToken",
    "Job", "JobEvent", "ModelInfo", "NotFound", "OptimResult", "OutOfRange", "PermissionDenied",
    "Quotas", "ResourceExhausted", "Session", "SessionInfo", "Tenant", "TenantDeletion",
    "TokenInfo", "TokenLogprob", "Unauthenticated", "Unavailable", "Unimplemented", "Unknown",
    "Usage",
]
