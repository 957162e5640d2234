"""The JSON body of a request, as the routes that take one read it."""

from __future__ import annotations

from starlette.requests import Request

from cotune import bounded_json
from cotune.server.http.errors import invalid

MAX_BODY_BYTES = 64 << 20  # JSON bodies; as the gRPC server's message bound


async def json_body(request: Request) -> dict:
    """The request's JSON object; 400 naming what is accepted when it is not one."""
    data = await request.body()
    if len(data) > MAX_BODY_BYTES:
        raise invalid(f"the body has {len(data)} bytes; accepted: at most {MAX_BODY_BYTES}")
    try:
        body = bounded_json.loads(data)
    except ValueError as e:
        raise invalid(f"the body is not valid JSON ({e}); accepted: a JSON object") from None
    if not isinstance(body, dict):
        raise invalid(f"the body is a JSON {type(body).__name__}; accepted: a JSON object")
    return body
