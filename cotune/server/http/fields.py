"""The fields of an OpenAI request body, read with their JSON types checked: a field of the
wrong type is a 400 naming it and what is accepted. Only types are checked here; the values
(ranges of temperature, top_p, logprobs...) are the gRPC services' to check, so that HTTP and
gRPC callers are told the same.

A field that the endpoint does not know is refused, except those that common SDKs and
frameworks send with a value that asks for nothing (`NEUTRAL`, and `user`): a client is never
silently served something other than what it asked for."""

from __future__ import annotations

from starlette.requests import Request

from cotune import bounded_json
from cotune.server.http.errors import invalid

MAX_BODY_BYTES = 64 << 20  # JSON bodies; as the gRPC server's message bound
INT32 = (-(2**31), 2**31 - 1)  # the proto fields' own ranges: larger values do not encode
INT64 = (-(2**63), 2**63 - 1)

# Fields of OpenAI's API that this server does not implement, with the value that asks for
# nothing, which passes: any other value is refused.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "tools": [],
           "tool_choice": "none", "functions": [], "function_call": "none",
           "response_format": {"type": "text"}, "echo": False, "best_of": 1, "suffix": ""}
IGNORED = {"user"}  # the end user's id, for OpenAI's abuse monitoring: nothing to do here


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
        raise invalid(f"the body is a JSON {_kind(body)}; accepted: a JSON object")
    return body


def check_known(body: dict, accepted: set[str], neutral: set[str], endpoint: str) -> None:
    """Refuses a field of `body` that is neither accepted nor ignored, or a field of `neutral`
    that asks for something."""
    for name, value in body.items():
        if name in accepted or name in IGNORED:
            continue
        if name in neutral:
            if value is not None and value != NEUTRAL[name]:
                raise invalid(f"{name} is not supported by this server; accepted: leave it out "
                              f"(or {NEUTRAL[name]!r})", name)
            continue
        raise invalid(f"unknown field {name[:60]!r} for {endpoint}; accepted: "
                      f"{', '.join(sorted(accepted | neutral | IGNORED))}", name)


def _kind(value) -> str:
    """The JSON type of a parsed value, as error messages name it."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
             dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def wrong(name: str, value, accepted: str) -> Exception:
    return invalid(f"{name} is a JSON {_kind(value)}; accepted: {accepted}", name)


def text(value, name: str) -> str:
    """`value` as a string that encodes (JSON may carry lone surrogates, which do not)."""
    if not isinstance(value, str):
        raise wrong(name, value, "a string")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise invalid(f"{name} is not valid Unicode (a lone surrogate); accepted: a string of "
                      "Unicode characters", name) from None
    return value


def integer(value, name: str, bounds: tuple[int, int] = INT32) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise wrong(name, value, "an integer")
    if not bounds[0] <= value <= bounds[1]:
        raise invalid(f"{name} {value} is out of range; accepted: an integer from {bounds[0]} "
                      f"to {bounds[1]}", name)
    return value


def number(value, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise wrong(name, value, "a number")
    return float(value)


def boolean(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise wrong(name, value, "true or false")
    return value


def optional(body: dict, name: str, read, *args):
    """`read(body[name], name, *args)`, or None when the field is absent or null."""
    value = body.get(name)
    return None if value is None else read(value, name, *args)


def stop_strings(value, name: str) -> list[str]:
    """OpenAI's `stop`: a string or an array of strings."""
    if isinstance(value, str):
        return [text(value, name)]
    if not isinstance(value, list):
        raise wrong(name, value, "a string or an array of strings")
    return [text(s, f"{name}[{i}]") for i, s in enumerate(value)]
