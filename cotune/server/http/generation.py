"""What completions and chat completions share: the sampling fields, the model a call names,
its choices as Generate calls run together, and the answer as one JSON object or as
server-sent events. Each endpoint brings its inputs and its `Shape` (the form of a choice).

A streamed answer starts (HTTP 200) only once every choice has its first response: a refusal
(unknown model, bad input, quota, draining) comes before it, so it keeps its HTTP status.
A client that goes away cancels the calls, and the server aborts their requests in the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cotune.server.http.backend import Backend, metadata
from cotune.server.http.errors import ApiError, from_grpc, invalid, not_found
from cotune.server.http.fields import (
    INT64,
    boolean,
    integer,
    number,
    optional,
    stop_strings,
    text,
    wrong,
)
from cotune.v1 import inference_pb2

MAX_CHOICES = 16  # Generate calls of one HTTP call (n, times the prompts of a completion)
FIELDS = {"model", "n", "stream", "stream_options", "temperature", "top_p", "seed", "stop"}
NEUTRAL_FIELDS = {"frequency_penalty", "presence_penalty", "logit_bias"}
# OpenAI has no "abort": a request aborted in the engine (by an Abort call) ended as asked.
FINISH = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length",
          inference_pb2.FINISH_REASON_ABORT: "stop"}


@dataclass
class Params:
    model: str
    sampling: inference_pb2.SamplingParams
    n: int
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def read_params(body: dict, max_tokens: int | None, logprobs: int | None) -> Params:
    """The fields both endpoints share; `max_tokens` and `logprobs` are read by each endpoint
    (their names and forms differ)."""
    model = optional(body, "model", text)
    if not model:
        raise invalid("model is missing; accepted: the base model's id or the name of one of "
                      "your adapters, as GET /v1/models lists them", "model")
    stream = optional(body, "stream", boolean) or False
    sampling = inference_pb2.SamplingParams(
        max_tokens=max_tokens, logprobs=logprobs,
        temperature=optional(body, "temperature", number), top_p=optional(body, "top_p", number),
        seed=optional(body, "seed", integer, INT64),
        stop=optional(body, "stop", stop_strings) or [])
    n = optional(body, "n", integer)
    return Params(model, sampling, 1 if n is None else n, stream,
                  _include_usage(body.get("stream_options"), stream))


def _include_usage(options, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options is only accepted with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise wrong("stream_options", options, 'an object such as {"include_usage": true}')
    unknown = set(options) - {"include_usage"}
    if unknown:
        raise invalid(f"stream_options has unknown fields {sorted(unknown)}; accepted: "
                      "include_usage", "stream_options")
    return optional(options, "include_usage", boolean) or False


@dataclass
class Choice:
    """One choice as its responses arrive."""

    index: int
    text: str = ""
    logprobs: list = field(default_factory=list)  # inference_pb2.TokenLogprob
    started: bool = False  # a response arrived
    finish_reason: str | None = None
    usage: inference_pb2.Usage | None = None  # from the last response

    def add(self, response: inference_pb2.GenerateResponse) -> None:
        self.started = True
        self.text += response.text
        self.logprobs.extend(response.logprobs)
        if response.finish_reason:
            self.finish_reason = FINISH[response.finish_reason]
            self.usage = response.usage


class Shape(Protocol):
    """An endpoint's objects."""

    prefix: str  # of the response id: "cmpl", "chatcmpl"
    object: str  # of the whole answer
    chunk_object: str  # of a streamed chunk

    def choice(self, choice: Choice) -> dict:
        """A finished choice, whole."""

    def delta(self, choice: Choice, response: inference_pb2.GenerateResponse) -> dict:
        """The chunk's choice for `response`, with `choice` as it was before it."""


def finish_reason(response: inference_pb2.GenerateResponse) -> str | None:
    return FINISH.get(response.finish_reason)


async def respond(request: Request, backend: Backend, params: Params,
                  inputs: list[inference_pb2.GenerateRequest], shape: Shape) -> Response:
    """Runs `params.n` choices of each input (choice index: input * n + j, with seed + j
    where a seed is given) and answers as `shape` says."""
    caller = metadata(request)
    base = await backend.base_model(caller)
    calls = Calls(backend, caller, _requests(base, params, inputs))
    try:
        firsts = await _unless_disconnected(request, calls.first())
    except grpc.RpcError as e:
        calls.cancel()
        raise _refusal(e, params.model, base) from None
    except BaseException:
        calls.cancel()
        raise
    head = {"id": f"{shape.prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": firsts[0].adapter or base}
    choices = [Choice(i) for i in range(len(firsts))]
    if params.stream:
        events = _events(calls, firsts, choices, head, shape, params)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def collect() -> None:
        async for i, response in calls.responses(firsts):
            choices[i].add(response)
        await calls.ended()

    try:
        await _unless_disconnected(request, collect())
    finally:
        calls.cancel()
    return JSONResponse({**head, "object": shape.object,
                         "choices": [shape.choice(c) for c in choices],
                         "usage": _usage(choices, params.n)})


def _requests(base: str, params: Params, inputs: list[inference_pb2.GenerateRequest]
              ) -> list[inference_pb2.GenerateRequest]:
    total = params.n * len(inputs)
    if not 1 <= total <= MAX_CHOICES:
        raise invalid(f"n is {params.n} for {len(inputs)} prompt(s): {total} choices; accepted: "
                      f"n >= 1 and at most {MAX_CHOICES} choices (n times the prompts)", "n")
    adapter = "" if params.model == base else params.model
    seed = params.sampling.seed if params.sampling.HasField("seed") else None
    if seed is not None and seed + params.n - 1 > INT64[1]:
        raise invalid(f"seed {seed} leaves no room for {params.n} choices (choice j uses seed + "
                      f"j); accepted: at most {INT64[1] - params.n + 1}", "seed")
    requests = []
    for one in inputs:
        for j in range(params.n):
            generate = inference_pb2.GenerateRequest()
            generate.CopyFrom(one)
            generate.adapter = adapter
            generate.sampling.CopyFrom(params.sampling)
            if seed is not None:
                generate.sampling.seed = seed + j  # choices differ, and each is reproducible
            requests.append(generate)
    return requests


def _refusal(error: grpc.RpcError, model: str, base: str) -> ApiError:
    if error.code() == grpc.StatusCode.NOT_FOUND:  # the only thing a Generate finds: the model
        return not_found(f"model {model!r} does not exist: {error.details()}; accepted: the "
                         f"base model {base!r} or one of your adapters (GET /v1/models), "
                         "as name or name@vK", "model")
    return from_grpc(error)


class Calls:
    """The Generate calls of one HTTP call. Cancelled together: the server's context callback
    aborts each request in the engine."""

    def __init__(self, backend: Backend, metadata, requests: list):
        self.calls = [backend.inference.Generate(r, metadata=metadata) for r in requests]

    async def first(self) -> list[inference_pb2.GenerateResponse]:
        """The first response of each call, or the first call's error."""
        return list(await asyncio.gather(*(_read(c) for c in self.calls)))

    async def responses(self, firsts: list) -> AsyncIterator[tuple[int, object]]:
        """(choice index, response) as the calls' responses arrive, `firsts` first."""
        reads = {}
        for i, response in enumerate(firsts):
            yield i, response
            if not response.finish_reason:
                reads[asyncio.ensure_future(_read(self.calls[i]))] = i
        try:
            while reads:
                done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = reads.pop(task)
                    response = task.result()
                    yield i, response
                    if not response.finish_reason:
                        reads[asyncio.ensure_future(_read(self.calls[i]))] = i
        finally:
            for task in reads:
                task.cancel()

    async def ended(self) -> None:
        """Waits for each call's status, which follows its last response: a call read to its
        end is never cancelled, so the server (and a router) count it as the success it is."""
        await asyncio.gather(*(call.code() for call in self.calls))

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()  # nothing for a call already done


async def _read(call) -> inference_pb2.GenerateResponse:
    response = await call.read()
    if response is grpc.aio.EOF:  # the server ends each stream with a finish reason
        raise ApiError(502, "a generation ended without a finish reason", "server_error")
    return response


async def _unless_disconnected(request: Request, work: Awaitable):
    """Awaits `work`, cancelled when the client goes away first (no tokens for no one)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done():  # the client went away: the answer reaches no one
            raise ApiError(499, "the client closed the request", "cancelled") from None
        raise
    finally:
        watcher.cancel()


async def _events(calls: Calls, firsts: list, choices: list[Choice], head: dict, shape: Shape,
                  params: Params) -> AsyncIterator[str]:
    """Server-sent events, one chunk per response, then `data: [DONE]`. An error after the
    start is an event of its own (OpenAI's error object), as the `openai` client reads it."""
    chunk = {**head, "object": shape.chunk_object}
    if params.include_usage:
        chunk["usage"] = None  # on every chunk but the last, as OpenAI's
    responses = calls.responses(firsts)
    try:
        async for i, response in responses:
            yield _event({**chunk, "choices": [shape.delta(choices[i], response)]})
            choices[i].add(response)
        await calls.ended()
        if params.include_usage:
            yield _event({**chunk, "choices": [], "usage": _usage(choices, params.n)})
    except grpc.RpcError as e:
        yield _event(from_grpc(e).body())
    finally:  # the end, an error, or the client gone (its task cancelled)
        calls.cancel()
        await responses.aclose()  # its reads pending, if any, cancelled
    yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _usage(choices: list[Choice], n: int) -> dict:
    """Tokens summed over the choices, each prompt counted once (as OpenAI's: the n choices
    of one prompt are choices[k * n:(k + 1) * n])."""
    prompt = sum(c.usage.prompt_tokens for c in choices[::n])
    completion = sum(c.usage.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
