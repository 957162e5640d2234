"""`GET /v1/models` and `/v1/models/{id}`: the base model and the caller's adapters, as vLLM
lists them (an adapter's `parent` and `root` are the base). An adapter's id is its name, which
serves its newest version; `name@vK` serves version K."""

from __future__ import annotations

import sys

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cotune.server.http.backend import Backend, metadata
from cotune.server.http.errors import from_grpc, not_found
from cotune.server.http.listing import collect
from cotune.v1 import adapters_pb2


def routes(backend: Backend) -> list[Route]:
    def card(id: str, created: int, base: str, adapter: bool) -> dict:
        return {"id": id, "object": "model", "created": created, "owned_by": "cotune",
                "root": base, "parent": base if adapter else None}

    async def list_models(request: Request) -> JSONResponse:
        base = await backend.base_model(metadata(request))
        adapters, _ = await collect(request, backend.adapters.ListAdapters,
                                    adapters_pb2.ListAdaptersRequest(), "adapters", sys.maxsize)
        return JSONResponse({"object": "list", "data": [card(base, 0, base, adapter=False)] + [
            card(a.name, a.create_time.seconds, base, adapter=True) for a in adapters]})

    async def get_model(request: Request) -> JSONResponse:
        model = request.path_params["model"]
        base = await backend.base_model(metadata(request))
        if model == base:
            return JSONResponse(card(base, 0, base, adapter=False))
        name = model.partition("@")[0]
        try:
            record = await backend.adapters.GetAdapter(adapters_pb2.GetAdapterRequest(name=name),
                                                       metadata=metadata(request))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise not_found(f"model {model!r} does not exist: it is neither the base "
                                f"model {base!r} nor one of your adapters", "model") from None
            raise from_grpc(e, "model") from None
        return JSONResponse(card(model, record.create_time.seconds, base, adapter=True))

    return [Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"])]
