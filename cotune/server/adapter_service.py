"""AdapterService: the caller's adapters and their versions."""

from __future__ import annotations

from pathlib import Path

import grpc

from cotune.adapters.peft_format import AdapterError, load_peft_adapter
from cotune.adapters.registry import Idempotency, Registry, Repeated
from cotune.server import convert
from cotune.server.errors import RpcError, invalid
from cotune.server.handlers import Gate, rpc
from cotune.server.idempotency import idempotency
from cotune.server.merges import Merges
from cotune.server.names import parse_reference
from cotune.server.uploads import (
    ADAPTER_FILES,
    Staging,
    allowed_path,
    arriving,
    receive_files,
)
from cotune.v1 import adapters_pb2, adapters_pb2_grpc, common_pb2

CHUNK = 1 << 20
MAX_LABELS, MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_DESCRIPTION = 64, 63, 256, 4096


class AdapterService(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, gate: Gate, registry: Registry, staging: Staging,
                 base_modules: dict[str, tuple[int, int]], max_rank: int,
                 allowed_roots: list[Path], max_upload_bytes: int, upload_idle_s: float):
        self.gate, self.registry, self.staging = gate, registry, staging
        self.base_modules, self.max_rank = base_modules, max_rank
        self.allowed_roots, self.max_upload_bytes = allowed_roots, max_upload_bytes
        self.upload_idle_s = upload_idle_s
        self.merges = Merges(registry, staging, base_modules, max_rank, max_upload_bytes)

    @rpc(held_open=True)
    def CreateAdapter(self, request_iterator, context, tenant):
        with arriving(request_iterator, self.upload_idle_s) as requests:
            return self._create(requests, tenant)

    def _create(self, requests, tenant):
        first = next(requests, None)
        if first is None or first.WhichOneof("part") != "header":
            raise invalid("the first message of CreateAdapter must be its header")
        header = first.header
        name, _ = parse_reference(header.name, allow_version=False)
        _check_labels(header.labels, header.description)
        retry = idempotency(header.idempotency_key, header)
        if retry is not None and (earlier := self.registry.repeated(
                tenant.name, "CreateAdapter", retry)) is not None:
            return convert.version(earlier)  # a retry: nothing to receive, nothing to make
        if header.server_path:
            if not tenant.admin:
                raise RpcError(grpc.StatusCode.PERMISSION_DENIED,
                               "server_path needs an admin token; upload the files instead")
            source = allowed_path(header.server_path, self.allowed_roots, "adapter directories")
            return self._publish(tenant.name, name, source, "server_path", header, retry)
        with self.staging.directory() as upload:
            receive_files(_chunks(requests), upload, self.max_upload_bytes)
            return self._publish(tenant.name, name, upload, "upload", header, retry)

    def _publish(self, tenant: str, name: str, files: Path, source: str, header,
                 retry: Idempotency | None):
        # Parsed by the same code that serves it: a version that is published loads.
        try:
            load_peft_adapter(files, self.base_modules, self.max_rank)
        except AdapterError as e:
            if source != "upload":
                raise
            # the staging directory's path means nothing to the client: name the upload
            raise type(e)(str(e).replace(str(files), f"{name!r} (the upload)")) from None
        try:
            record = self.registry.publish_version(
                tenant, name, files, {"source": source}, description=header.description or None,
                labels=dict(header.labels) or None, idempotency=retry)
        except Repeated as repeated:  # the first call with the key committed meanwhile
            record = repeated.earlier
        return convert.version(record)

    @rpc()
    def GetAdapter(self, request, context, tenant):
        name, _ = parse_reference(request.name, allow_version=False)
        return convert.adapter(self.registry.get_adapter(tenant.name, name))

    @rpc()
    def ListAdapters(self, request, context, tenant):
        size = convert.page_size(request.page_size)
        records = self.registry.list_adapters(
            tenant.name, request.name_prefix, dict(request.labels) or None,
            convert.page_after(request.page_token), size)
        return adapters_pb2.ListAdaptersResponse(
            adapters=[convert.adapter(r) for r in records],
            next_page_token=convert.next_page(records, size, lambda r: r.name))

    @rpc()
    def ListVersions(self, request, context, tenant):
        name, _ = parse_reference(request.name, allow_version=False)
        size = convert.page_size(request.page_size)
        after = convert.page_after(request.page_token, int, "ListVersions")
        records = self.registry.list_versions(tenant.name, name, after, size)
        return adapters_pb2.ListVersionsResponse(
            versions=[convert.version(r) for r in records],
            next_page_token=convert.next_page(records, size, lambda r: r.version))

    @rpc()
    def DeleteAdapter(self, request, context, tenant):
        name, version = parse_reference(request.name)
        deleted = self.registry.delete_adapter(tenant.name, name, version)
        return adapters_pb2.DeleteAdapterResponse(versions_deleted=deleted)

    @rpc()
    def MergeAdapters(self, request, context, tenant):
        # computed here, on this gRPC thread: the engine serves on meanwhile
        _check_labels(request.labels, request.description)
        return convert.version(self.merges.merge(tenant.name, request))

    @rpc(held_open=True)
    def ExportAdapter(self, request, context, tenant):
        name, version = parse_reference(request.name)
        record = self.registry.get_version(tenant.name, name, version)
        for file_name in ADAPTER_FILES:  # streamed from the store, whichever it is
            with self.registry.open_version_file(record, file_name) as f:
                while data := f.read(CHUNK):
                    yield common_pb2.FileChunk(path=file_name, data=data)


def _chunks(requests):
    for request in requests:
        if request.WhichOneof("part") != "chunk":
            raise invalid("CreateAdapter takes one header, then file chunks only")
        yield request.chunk


def _check_labels(labels, description: str) -> None:
    if len(description) > MAX_DESCRIPTION:
        raise invalid(f"description has {len(description)} characters; accepted: at most "
                      f"{MAX_DESCRIPTION}")
    if len(labels) > MAX_LABELS:
        raise invalid(f"{len(labels)} labels; accepted: at most {MAX_LABELS}")
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_KEY or len(value) > MAX_LABEL_VALUE:
            raise invalid(f"label {key[:80]!r} not accepted; accepted: keys of 1-"
                          f"{MAX_LABEL_KEY} characters, values of at most {MAX_LABEL_VALUE}")
