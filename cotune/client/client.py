"""`Client`: the blocking SDK.

    with Client("127.0.0.1:50051", token) as client:
        client.adapters.create("summarizer", "path/to/peft_dir")
        for delta in client.generate("Summarize: ...", adapter="summarizer"):
            print(delta.text, end="", flush=True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import closing

import grpc

from cotune.client.api import ClientBase
from cotune.client.retry import backoff, retry_delay
from cotune.client.transport import Sink, Transport


class SyncTransport(Transport):
    """Calls on a `grpc.Channel`; see `transport.py` for the contract of each method."""

    def unary(self, rpc, request, convert: Callable):
        return convert(self._retrying(lambda: rpc(request, **self.options(self.timeout))))

    def upload(self, rpc, requests: Callable[[], Iterator], convert: Callable):
        return convert(self._retrying(lambda: rpc(requests(), **self.options(self.timeout))))

    def stream(self, rpc, request, convert: Callable, timeout: float | None) -> Iterator:
        for delay in backoff(self.retries):
            call = rpc(request, **self.options(timeout))
            try:
                for message in call:
                    delay = None  # a stream that yielded is not replayed: part of it was seen
                    yield convert(message)
                return
            except grpc.RpcError as error:
                time.sleep(retry_delay(error, delay))
            finally:
                call.cancel()  # when the consumer closes the iterator early, the server stops

    def paginate(self, rpc, request, field: str, convert: Callable) -> Iterator:
        while True:
            page = self._retrying(lambda: rpc(request, **self.options(self.timeout)))
            yield from map(convert, getattr(page, field))
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def fold(self, stream: Iterator, sink: Sink):
        with closing(stream), sink:
            for item in stream:
                if sink.add(item):
                    break
            return sink.finish()

    def then(self, value, fn: Callable):
        return fn(value)

    def _retrying(self, attempt: Callable):
        for delay in backoff(self.retries):
            try:
                return attempt()
            except grpc.RpcError as error:
                time.sleep(retry_delay(error, delay))


class Client(ClientBase):
    """A blocking connection to a cotune server, as the tenant of `token`; the arguments are
    described in `ClientBase`."""

    _grpc = grpc
    _transport_class = SyncTransport

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._t.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
