"""What the SDK's API needs from a transport, and what the sync and async transports share.

The API (`api.py`, `namespaces.py`) is written once: each method builds its request, names
the stub method and the conversion of the response, and hands them to its transport. The sync
transport (`client.py`) returns values and iterators; the async one (`aio.py`) returns
awaitables and async iterators of the same things. A transport provides:

- `unary(rpc, request, convert)`: one request, one response, retried on UNAVAILABLE.
- `upload(rpc, requests, convert)`: a client stream from `requests()`, re-sent whole on retry.
- `stream(rpc, request, convert, timeout)`: an iterator over a server stream, retried only
  until it yields its first message; closing it cancels the call.
- `paginate(rpc, request, field, convert)`: an iterator over `field` of every page.
- `fold(stream, sink)`: feeds a stream to a `Sink` and returns its result; closes the stream.
- `then(pending, fn)`: `fn` of the result of `pending` (for a call made after another).

Every gRPC failure leaves a transport as a `CotuneError` subclass.
"""

from __future__ import annotations

from dataclasses import dataclass

from cotune.client.types import TERMINAL_JOB_STATES


@dataclass
class Transport:
    """The channel and the settings of every call on it."""

    channel: object  # grpc.Channel or grpc.aio.Channel
    metadata: tuple[tuple[str, str], ...]  # the authorization header, when a token is set
    timeout: float | None  # deadline of unary calls, uploads and exports, in seconds
    retries: int  # more attempts after an UNAVAILABLE

    def options(self, timeout: float | None) -> dict:
        """The keyword arguments of a call with this deadline."""
        return {"metadata": self.metadata, "timeout": timeout}


class Sink:
    """Consumes a stream for `fold`: `add` each item (True: stop early), then `finish` for
    the result; `abort` instead when the stream or the sink failed (a `with` block does it)."""

    def add(self, item) -> bool:
        raise NotImplementedError

    def finish(self):
        return None

    def abort(self) -> None:
        """Nothing to undo by default."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, error_type, *_) -> None:
        if error_type is not None:
            self.abort()


class Collect(Sink):
    """Keeps every item and returns `finish(items)` at the end of the stream."""

    def __init__(self, finish):
        self.items: list = []
        self._finish = finish

    def add(self, item) -> bool:
        self.items.append(item)
        return False

    def finish(self):
        return self._finish(self.items)


class UntilDone(Sink):
    """Job events up to the first terminal state."""

    def add(self, event) -> bool:
        return event.kind == "state" and event.state in TERMINAL_JOB_STATES
