"""OpenAI's list endpoints over the gRPC List calls: `limit` and `after` (the id of the last
item the client saw) in, `{"object": "list", "data", "has_more", "first_id", "last_id"}` out.
A gRPC page token is the key of the item to continue after (page_tokens.py), so `after`
becomes one without a lookup."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request

from cotune.server import page_tokens
from cotune.server.http.backend import metadata
from cotune.server.http.errors import invalid


def limit_of(request: Request, default: int, maximum: int) -> int:
    """The `limit` query parameter; 400 naming the range when it is out of it."""
    text = request.query_params.get("limit")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise invalid(f"limit {text[:40]!r} not accepted; accepted: a whole number from 1 to "
                      f"{maximum}", "limit")
    return int(text)


async def collect(request: Request, call, message, field: str, limit: int,
                  after: str | int | None = None,
                  keep: Callable | None = None) -> tuple[list, bool]:
    """Up to `limit` items of `field` over as many pages of the List call `call` (`message`
    its request) as it takes, starting after the item keyed `after`, only those `keep`
    holds for; and whether more follow."""
    message.page_size = min(limit + 1, page_tokens.MAX_PAGE)  # one more than asked: has_more
    message.page_token = "" if after is None else page_tokens.encode(after)
    items: list = []
    while True:
        reply = await call(message, metadata=metadata(request))
        items += [item for item in getattr(reply, field) if keep is None or keep(item)]
        if len(items) > limit or not reply.next_page_token:
            return items[:limit], len(items) > limit
        message.page_token = reply.next_page_token


def list_object(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}
