"""FileService: the files a tenant uploads for its fine-tuning jobs. An upload goes through
the same machinery as an adapter's (uploads.py): a staging directory, the idle timeout, a place
among the open streams, --max-upload-mb; its lines are checked before it is kept."""

from __future__ import annotations

from cotune.adapters.registry import NotFound, QuotaExceeded, Registry, files_refusal
from cotune.engine.training_data import check_training_file
from cotune.server import convert
from cotune.server.errors import invalid
from cotune.server.handlers import Gate, rpc
from cotune.server.uploads import Staging, arriving, receive_file
from cotune.v1 import files_pb2, files_pb2_grpc

PURPOSES = ("fine-tune",)
MAX_FILENAME = 255
CHUNK = 1 << 20


class FileService(files_pb2_grpc.FileServiceServicer):
    def __init__(self, gate: Gate, registry: Registry, staging: Staging, max_upload_bytes: int,
                 upload_idle_s: float, max_files: int):
        self.gate, self.registry, self.staging = gate, registry, staging
        self.max_upload_bytes, self.upload_idle_s = max_upload_bytes, upload_idle_s
        self.max_files = max_files

    @rpc(held_open=True)
    def UploadFile(self, request_iterator, context, tenant):
        with arriving(request_iterator, self.upload_idle_s) as requests:
            first = next(requests, None)
            if first is None or first.WhichOneof("part") != "header":
                raise invalid("the first message of UploadFile must be its header "
                              "{filename, purpose}")
            filename, purpose = _checked(first.header)
            self._check_room(tenant.name)  # before a byte is received
            with self.staging.directory() as upload:
                staged = upload / "file"
                receive_file(_pieces(requests), staged, self.max_upload_bytes)
                check_training_file(staged, filename)  # DataError: INVALID_ARGUMENT, the line
                record = self.registry.add_file(tenant.name, filename, purpose, staged,
                                                self.max_files)
        return convert.file(record)

    def _check_room(self, tenant: str) -> None:
        """Refuses early an upload that add_file would refuse once it is whole (which checks
        again, in its transaction, against uploads that finish meanwhile)."""
        if self.max_files:
            count = len(self.registry.list_files(tenant, limit=self.max_files))
            if count >= self.max_files:
                raise QuotaExceeded("max_files", files_refusal(tenant, count))

    @rpc()
    def GetFile(self, request, context, tenant):
        return convert.file(self.registry.get_file(tenant.name, request.id))

    @rpc()
    def ListFiles(self, request, context, tenant):
        size = convert.page_size(request.page_size)
        after = convert.page_after(request.page_token, str, "ListFiles")
        records = self.registry.list_files(tenant.name, request.purpose, after, size)
        return files_pb2.ListFilesResponse(
            files=[convert.file(r) for r in records],
            next_page_token=convert.next_page(records, size, lambda r: r.id))

    @rpc()
    def DeleteFile(self, request, context, tenant):
        self.registry.delete_file(tenant.name, request.id)
        return files_pb2.DeleteFileResponse()

    @rpc(held_open=True)
    def GetFileContent(self, request, context, tenant):
        with open_file(self.registry, tenant.name, request.id) as f:
            while data := f.read(CHUNK):
                yield files_pb2.FileData(data=data)


def open_file(registry: Registry, tenant: str, file_id: str):
    """The tenant's file `file_id`, open for reading: once open, a deletion does not cut it
    short. NotFound also when it is deleted between the lookup and the open."""
    record = registry.get_file(tenant, file_id)
    try:
        return registry.open_file(record)
    except FileNotFoundError:  # deleted since the lookup
        raise NotFound(f"file {file_id!r} not found") from None


def _checked(header: files_pb2.UploadFileHeader) -> tuple[str, str]:
    if header.purpose not in PURPOSES:
        raise invalid(f"purpose {header.purpose[:80]!r} not accepted; accepted: "
                      f"{', '.join(PURPOSES)}")
    name = header.filename
    if not 0 < len(name) <= MAX_FILENAME or any(c < " " or c == "\x7f" for c in name):
        raise invalid(f"filename {name[:80]!r} not accepted; accepted: 1-{MAX_FILENAME} "
                      "characters, no control characters")
    return name, header.purpose


def _pieces(requests):
    for request in requests:
        if request.WhichOneof("part") != "data":
            raise invalid("UploadFile takes one header, then data messages only")
        yield request.data
