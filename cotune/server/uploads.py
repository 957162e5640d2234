"""Receiving uploads from a client stream into a private staging directory, with the checks
that come before any parsing: for an adapter, known file names only, each file in one run of
chunks; for any upload, a size limit. Nothing here is published: the caller validates and
publishes, then the staging directory goes (and a crash leaves only what the next start
sweeps)."""

from __future__ import annotations

import queue
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from cotune.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from cotune.server.errors import RpcError, invalid
from cotune.v1 import common_pb2

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)


class Staging:
    """Upload directories `<uuid>.<owner>` under `root`, which workers sharing a data
    directory share: each sweeps only its own (`owner`: its --worker-id)."""

    def __init__(self, root: Path, owner: str):
        self.root, self.owner = root, owner
        root.mkdir(parents=True, exist_ok=True)
        for debris in root.iterdir():  # of uploads a crash of this worker interrupted
            if debris.name.partition(".")[2] == owner:
                shutil.rmtree(debris, ignore_errors=True)

    @contextmanager
    def directory(self) -> Iterator[Path]:
        path = self.root / f"{uuid.uuid4().hex}.{self.owner}"
        path.mkdir(mode=0o700)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def arriving(requests: Iterator, idle_s: float) -> Iterator[Iterator]:
    """The messages of `requests`, a client stream, read on a thread of their own, so that a
    client that stops sending is noticed: when none arrives for `idle_s` seconds, iterating
    raises DEADLINE_EXCEEDED and the caller's call ends, its place among the open streams
    free. Idle uploads would otherwise hold those places as long as their clients like."""
    reader = _Reader(requests)
    try:
        yield reader.messages(idle_s)
    finally:
        reader.close()


class _Reader:
    """Reads one message of a client stream each time one is asked for, so that no more is
    held here than gRPC itself holds. Once the call ends, gRPC's iterator ends too, and so
    does the reading thread."""

    def __init__(self, requests: Iterator):
        self._requests = requests
        self._wanted = threading.Semaphore(0)
        self._arrived: queue.SimpleQueue = queue.SimpleQueue()  # messages, or how it ended
        self._closed = False
        threading.Thread(target=self._read, name="upload-reader", daemon=True).start()

    def _read(self) -> None:
        while True:
            self._wanted.acquire()
            if self._closed:
                return
            try:
                self._arrived.put(next(self._requests))
            except BaseException as e:  # noqa: BLE001 - messages() passes each on
                # StopIteration, the call's end, or a refusal of bytes that do not parse
                self._arrived.put(e)
                return

    def messages(self, idle_s: float) -> Iterator:
        while True:
            self._wanted.release()
            try:
                message = self._arrived.get(timeout=idle_s)
            except queue.Empty:
                raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"the upload sent nothing for {idle_s:g} s, this server's "
                               "--upload-idle-timeout; it is dropped, nothing of it kept. "
                               "Send the files without pauses that long") from None
            if isinstance(message, StopIteration):
                return
            if isinstance(message, BaseException):
                raise message
            yield message

    def close(self) -> None:
        self._closed = True
        self._wanted.release()


def receive_files(chunks: Iterable[common_pb2.FileChunk], into: Path, max_bytes: int) -> None:
    """Writes the chunks' files into `into`; both adapter files must arrive."""
    done: set[str] = set()
    current, total, out = None, 0, None
    try:
        for chunk in chunks:
            if chunk.path != current:
                if chunk.path not in ADAPTER_FILES:
                    raise invalid(f"file {chunk.path!r} not accepted; accepted: "
                                  f"{', '.join(ADAPTER_FILES)}")
                if chunk.path in done:
                    raise invalid(f"the chunks of {chunk.path} came in two runs; accepted: all "
                                  "chunks of a file one after another")
                if out is not None:
                    out.close()
                    done.add(current)
                current, out = chunk.path, open(into / chunk.path, "wb")
            total = _counted(total, len(chunk.data), max_bytes)
            out.write(chunk.data)
    finally:
        if out is not None:
            out.close()
    if current is not None:
        done.add(current)
    missing = [name for name in ADAPTER_FILES if name not in done]
    if missing:
        raise invalid(f"the upload lacks {', '.join(missing)}; accepted: a PEFT adapter "
                      f"directory's {' and '.join(ADAPTER_FILES)}")


def receive_file(pieces: Iterable[bytes], into: Path, max_bytes: int) -> None:
    """Writes the pieces, in order, to the file `into`."""
    total = 0
    with open(into, "wb") as out:
        for data in pieces:
            total = _counted(total, len(data), max_bytes)
            out.write(data)


def _counted(total: int, more: int, max_bytes: int) -> int:
    """The bytes of the upload so far and `more`, refused past `max_bytes`."""
    if total + more > max_bytes:
        raise invalid(f"the upload exceeds {max_bytes >> 20} MiB, this server's "
                      "--max-upload-mb")
    return total + more


def allowed_path(text: str, roots: list[Path], what: str) -> Path:
    """`text` resolved (symlinks and '..' included), if it lies under one of `roots`."""
    if not roots:
        raise invalid(f"this server allows no server-side {what}; upload it instead, or start "
                      "the server with --allow-path DIR")
    try:
        path = Path(text).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise invalid(f"server path {text!r} does not exist") from None
    if not any(path.is_relative_to(root.resolve()) for root in roots):
        raise invalid(f"server path {text!r} is outside the allowed directories "
                      f"({', '.join(str(r) for r in roots)})")
    return path
