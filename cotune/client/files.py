"""The client's disk in uploads and downloads: the two PEFT files of an adapter, read for an
upload and written by an export (nothing else is ever read or written, whatever the server
sends), and a training file read for an upload."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from cotune.client.errors import DataLoss
from cotune.client.transport import Sink
from cotune.v1 import adapters_pb2, common_pb2, files_pb2

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHUNK_BYTES = 1 << 20


def upload_requests(header: adapters_pb2.CreateAdapterHeader, path: str | os.PathLike
                    ) -> Callable[[], Iterator[adapters_pb2.CreateAdapterRequest]]:
    """A function that returns the CreateAdapter stream of the PEFT directory `path` (or of
    the directory of the file `path`): the header, then each file in 1 MiB chunks.

    A function rather than one iterator, so that a retry re-sends the upload whole (the
    server publishes complete uploads only). Checks the files are there before any call."""
    directory = Path(path).parent if Path(path).is_file() else Path(path)
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a PEFT adapter directory: it has no "
                                f"{' and no '.join(missing)}")

    def requests() -> Iterator[adapters_pb2.CreateAdapterRequest]:
        yield adapters_pb2.CreateAdapterRequest(header=header)
        for name in ADAPTER_FILES:
            with open(directory / name, "rb") as f:
                while True:  # an empty file still sends one (empty) chunk: it exists
                    data = f.read(CHUNK_BYTES)
                    yield adapters_pb2.CreateAdapterRequest(
                        chunk=common_pb2.FileChunk(path=name, data=data))
                    if len(data) < CHUNK_BYTES:
                        break

    return requests


def file_upload_requests(data: str | os.PathLike | bytes, purpose: str, filename: str | None
                         ) -> Callable[[], Iterator[files_pb2.UploadFileRequest]]:
    """A function that returns the UploadFile stream of `data` (a file's path or its bytes):
    the header, then 1 MiB pieces; re-callable for a retry, as `upload_requests`. The name is
    `filename`, else the path's name ("upload.jsonl" for bytes)."""
    if isinstance(data, bytes):
        name = filename or "upload.jsonl"
    else:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file")
        name = filename or path.name
    header = files_pb2.UploadFileHeader(filename=name, purpose=purpose)

    def requests() -> Iterator[files_pb2.UploadFileRequest]:
        yield files_pb2.UploadFileRequest(header=header)
        if isinstance(data, bytes):
            for start in range(0, len(data), CHUNK_BYTES):
                yield files_pb2.UploadFileRequest(data=data[start:start + CHUNK_BYTES])
            return
        with open(path, "rb") as f:
            while piece := f.read(CHUNK_BYTES):
                yield files_pb2.UploadFileRequest(data=piece)

    return requests


class ExportWriter(Sink):
    """Writes an ExportAdapter stream into a temporary directory beside `dest` and renames it
    to `dest` once every file has arrived, so `dest` never holds a partial adapter.

    Refuses a `dest` that exists (nothing is overwritten) and any file name from the server
    that is not one of the two PEFT files (no path of the server's choosing is written)."""

    def __init__(self, dest: str | os.PathLike):
        self.dest = Path(dest)
        if self.dest.exists():
            raise FileExistsError(f"{self.dest} exists; export into a path that does not")
        self._tmp: Path | None = None
        self._file = None
        self._written: list[str] = []

    def add(self, chunk: common_pb2.FileChunk) -> bool:
        """Appends one chunk; False: the stream goes on."""
        if chunk.path not in ADAPTER_FILES:
            raise DataLoss(f"the server sent a file named {chunk.path!r}; an adapter has only "
                           f"{' and '.join(ADAPTER_FILES)}. Nothing was written to {self.dest}")
        if not self._written or self._written[-1] != chunk.path:
            if chunk.path in self._written:
                raise DataLoss(f"the server sent {chunk.path} in two separate runs of chunks")
            self._close()
            if self._tmp is None:  # beside dest, so that the rename stays on one filesystem
                self.dest.parent.mkdir(parents=True, exist_ok=True)
                self._tmp = self.dest.parent / f".{self.dest.name}.{secrets.token_hex(4)}.partial"
                self._tmp.mkdir()
            self._file = open(self._tmp / chunk.path, "wb")  # closed by _close
            self._written.append(chunk.path)
        self._file.write(chunk.data)
        return False

    def finish(self) -> Path:
        """The stream ended: checks both files came, then moves them into place."""
        self._close()
        missing = [name for name in ADAPTER_FILES if name not in self._written]
        if missing:
            raise DataLoss(f"the export stream ended without {' and '.join(missing)}")
        os.rename(self._tmp, self.dest)
        return self.dest

    def abort(self) -> None:
        """The stream failed: removes what was written."""
        self._close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before the rename makes it visible
            self._file.close()
            self._file = None
