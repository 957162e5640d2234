"""Page tokens of the List calls: the key of the last item of a page (an id, a name, a
number), as url-safe base64 of JSON. Opaque to gRPC clients; the HTTP front makes one from
OpenAI's `after` (the id of the last item the client saw). Imports no torch: the front and the
router use it."""

from __future__ import annotations

import base64
import json

from cotune import bounded_json

DEFAULT_PAGE, MAX_PAGE = 50, 1000  # items of a List call's page: page_size 0, the most


def encode(after: str | int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()


def decode(token: str) -> str | int:
    """The key in `token`; ValueError for a token this server did not make."""
    try:
        after = bounded_json.loads(base64.urlsafe_b64decode(token.encode("ascii")))["after"]
    except (ValueError, KeyError, TypeError, UnicodeError):
        raise ValueError(token) from None
    if isinstance(after, bool) or not isinstance(after, (str, int)):
        raise ValueError(token)  # a forged token: the registry would fail on it
    return after
