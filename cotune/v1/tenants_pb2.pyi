import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Quotas(_message.Message):
    __slots__ = ("max_adapters", "max_versions_per_adapter", "max_concurrent_jobs", "max_queued_requests", "max_tokens_per_minute", "max_sessions")
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSIONS_PER_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    max_adapters: int
    max_versions_per_adapter: int
    max_concurrent_jobs: int
    max_queued_requests: int
    max_tokens_per_minute: int
    max_sessions: int
    def __init__(self, max_adapters: _Optional[int] = ..., max_versions_per_adapter: _Optional[int] = ..., max_concurrent_jobs: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., max_tokens_per_minute: _Optional[int] = ..., max_sessions: _Optional[int] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("name", "admin", "quotas", "create_time", "tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    admin: bool
    quotas: Quotas
    create_time: _timestamp_pb2.Timestamp
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, name: _Optional[str] = ..., admin: _Optional[bool] = ..., quotas: _Optional[_Union[Quotas, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("id", "description", "create_time", "revoked")
    ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    id: str
    description: str
    create_time: _timestamp_pb2.Timestamp
    revoked: bool
    def __init__(self, id: _Optional[str] = ..., description: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked: _Optional[bool] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("name", "admin", "quotas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    admin: bool
    quotas: Quotas
    def __init__(self, name: _Optional[str] = ..., admin: _Optional[bool] = ..., quotas: _Optional[_Union[Quotas, _Mapping]] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants", "next_page_token")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    next_page_token: str
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SetQuotasRequest(_message.Message):
    __slots__ = ("name", "quotas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    quotas: Quotas
    def __init__(self, name: _Optional[str] = ..., quotas: _Optional[_Union[Quotas, _Mapping]] = ...) -> None: ...

class IssueTokenRequest(_message.Message):
    __slots__ = ("tenant", "description")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    description: str
    def __init__(self, tenant: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class IssuedToken(_message.Message):
    __slots__ = ("id", "token")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    id: str
    token: str
    def __init__(self, id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    def __init__(self, revoked: _Optional[bool] = ...) -> None: ...

class DeleteTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ("adapters_deleted", "versions_deleted", "jobs_deleted", "jobs_cancelled", "tokens_deleted", "files_deleted")
    ADAPTERS_DELETED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_DELETED_FIELD_NUMBER: _ClassVar[int]
    JOBS_DELETED_FIELD_NUMBER: _ClassVar[int]
    JOBS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DELETED_FIELD_NUMBER: _ClassVar[int]
    FILES_DELETED_FIELD_NUMBER: _ClassVar[int]
    adapters_deleted: int
    versions_deleted: int
    jobs_deleted: int
    jobs_cancelled: int
    tokens_deleted: int
    files_deleted: int
    def __init__(self, adapters_deleted: _Optional[int] = ..., versions_deleted: _Optional[int] = ..., jobs_deleted: _Optional[int] = ..., jobs_cancelled: _Optional[int] = ..., tokens_deleted: _Optional[int] = ..., files_deleted: _Optional[int] = ...) -> None: ...
