"""`/v1/files`: OpenAI's files, translated to FileService. An upload (multipart/form-data: a
`file` part and a `purpose` field) is streamed into UploadFile in 1 MiB pieces, never read
whole; FileService checks it (a fine-tune file line by line: a bad line is a 400 naming it),
bounds its size (--max-upload-mb) and the tenant's files (--max-files-per-tenant: 429).
A file is `processed` as soon as it exists: it was checked before it was kept."""

from __future__ import annotations

import grpc
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from cotune.server.http.backend import Backend, metadata
from cotune.server.http.errors import ApiError, from_grpc, invalid
from cotune.server.http.listing import collect, limit_of, list_object
from cotune.v1 import files_pb2

CHUNK = 1 << 20
MULTIPART_SLACK = 64 << 10  # the multipart framing and fields beside the file
MAX_LIST = 10_000  # OpenAI's largest `limit` of GET /v1/files, and its default


def file_object(f: files_pb2.File) -> dict:
    return {"id": f.id, "object": "file", "bytes": f.size_bytes,
            "created_at": f.create_time.seconds, "filename": f.filename, "purpose": f.purpose,
            "status": "processed", "status_details": None, "expires_at": None}


def routes(backend: Backend) -> list[Route]:
    async def upload(request: Request) -> JSONResponse:
        md = metadata(request)
        # the body is parsed (and spooled to disk) before UploadFile sees it: only for a
        # caller the server accepts, and only up to the server's bound
        await backend.authenticate(md)
        limit = backend.max_upload_bytes + MULTIPART_SLACK
        bounded = Request(request.scope, _bounded(request, limit))
        form = await bounded.form(max_files=1, max_fields=16)
        try:
            part, purpose = form.get("file"), form.get("purpose")
            if not isinstance(part, UploadFile):
                raise invalid("no file part 'file' in the body; accepted: multipart/form-data "
                              "with a 'file' part and a 'purpose' field", "file")
            if not isinstance(purpose, str):
                raise invalid("no 'purpose' field in the body; accepted: 'fine-tune'", "purpose")

            async def messages():
                yield files_pb2.UploadFileRequest(header=files_pb2.UploadFileHeader(
                    filename=part.filename or "upload.jsonl", purpose=purpose))
                while data := await part.read(CHUNK):
                    yield files_pb2.UploadFileRequest(data=data)

            try:
                reply = await backend.files.UploadFile(messages(), metadata=md)
            except grpc.RpcError as e:
                # FileService's refusals start with what they refuse: the purpose or the file
                about = "purpose" if (e.details() or "").startswith("purpose") else "file"
                raise from_grpc(e, about) from None
        finally:
            await form.close()
        return JSONResponse(file_object(reply))

    async def list_files(request: Request) -> JSONResponse:
        order = request.query_params.get("order", "desc")
        if order != "desc":
            raise invalid(f"order {order[:40]!r} not accepted; accepted: desc (newest first)",
                          "order")
        files, more = await collect(
            request, backend.files.ListFiles,
            files_pb2.ListFilesRequest(purpose=request.query_params.get("purpose", "")),
            "files", limit_of(request, MAX_LIST, MAX_LIST), request.query_params.get("after"))
        return JSONResponse(list_object([file_object(f) for f in files], more))

    async def get_file(request: Request) -> JSONResponse:
        return JSONResponse(file_object(await _call(backend.files.GetFile, request)))

    async def delete_file(request: Request) -> JSONResponse:
        await _call(backend.files.DeleteFile, request, files_pb2.DeleteFileRequest)
        return JSONResponse({"id": request.path_params["file_id"], "object": "file",
                             "deleted": True})

    async def content(request: Request) -> StreamingResponse:
        call = backend.files.GetFileContent(
            files_pb2.GetFileRequest(id=request.path_params["file_id"]),
            metadata=metadata(request))
        try:  # the call's status before a byte of the response: a 404 stays a 404
            first = await call.read()
        except grpc.RpcError as e:
            raise from_grpc(e, "file_id") from None

        async def body():
            piece = first
            while piece is not grpc.aio.EOF:
                yield piece.data
                piece = await call.read()

        return StreamingResponse(body(), media_type="application/octet-stream")

    return [Route("/v1/files", upload, methods=["POST"]),
            Route("/v1/files", list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", get_file, methods=["GET"]),
            Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", content, methods=["GET"])]


def _bounded(request: Request, limit: int):
    """`request`'s receive, refusing (413) a body past `limit` bytes: by its Content-Length
    before a byte is read, or as the bytes arrive."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise _too_large(received, limit)
        return message

    return receive


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the upload has {size} bytes or more; accepted: a file of at most "
                    f"{limit - MULTIPART_SLACK} bytes (the server's --max-upload-mb)",
                    param="file", code="file_too_large")


async def _call(rpc, request: Request, message=files_pb2.GetFileRequest):
    """`rpc` on the file of the path; its errors name `file_id`."""
    try:
        return await rpc(message(id=request.path_params["file_id"]), metadata=metadata(request))
    except grpc.RpcError as e:
        raise from_grpc(e, "file_id") from None
