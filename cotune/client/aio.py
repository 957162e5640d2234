"""`AsyncClient`: the SDK on asyncio, with the surface of `Client`.

    async with AsyncClient("127.0.0.1:50051", token) as client:
        await client.adapters.create("summarizer", "path/to/peft_dir")
        async for delta in client.generate("Summarize: ...", adapter="summarizer"):
            print(delta.text, end="", flush=True)

Calls return awaitables; generate, watch and the listings return async iterators.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing

import grpc
import grpc.aio

from cotune.client.api import ClientBase
from cotune.client.retry import backoff, retry_delay
from cotune.client.transport import Sink, Transport


class AsyncTransport(Transport):
    """Calls on a `grpc.aio.Channel`; see `transport.py` for the contract of each method."""

    async def unary(self, rpc, request, convert: Callable):
        return convert(await self._retrying(lambda: rpc(request, **self.options(self.timeout))))

    async def upload(self, rpc, requests: Callable[[], Iterator], convert: Callable):
        return convert(await self._retrying(
            lambda: rpc(requests(), **self.options(self.timeout))))

    async def stream(self, rpc, request, convert: Callable,
                     timeout: float | None) -> AsyncIterator:
        for delay in backoff(self.retries):
            call = rpc(request, **self.options(timeout))
            try:
                async for message in call:
                    delay = None  # a stream that yielded is not replayed: part of it was seen
                    yield convert(message)
                return
            except grpc.RpcError as error:
                await asyncio.sleep(retry_delay(error, delay))
            finally:
                call.cancel()  # when the consumer closes the iterator early, the server stops

    async def paginate(self, rpc, request, field: str, convert: Callable) -> AsyncIterator:
        while True:
            page = await self._retrying(lambda: rpc(request, **self.options(self.timeout)))
            for item in getattr(page, field):
                yield convert(item)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def fold(self, stream: AsyncIterator, sink: Sink):
        async with aclosing(stream):
            with sink:
                async for item in stream:
                    if sink.add(item):
                        break
                return sink.finish()

    async def then(self, pending, fn: Callable):
        result = fn(await pending)
        return await result if inspect.isawaitable(result) else result

    async def _retrying(self, attempt: Callable):
        for delay in backoff(self.retries):
            try:
                return await attempt()
            except grpc.RpcError as error:
                await asyncio.sleep(retry_delay(error, delay))


class AsyncClient(ClientBase):
    """An asyncio connection to a cotune server, as the tenant of `token`; the arguments are
    described in `ClientBase`. Make it inside a running event loop: its channel binds to it."""

    _grpc = grpc.aio
    _transport_class = AsyncTransport

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._t.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
