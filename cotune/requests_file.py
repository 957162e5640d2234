"""Reading a JSONL file of generation requests, with errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

from cotune import bounded_json
from cotune.engine.runtime import Request

_FIELDS = {
    "prompt": (str,),
    "prompt_token_ids": (list,),
    "adapter": (str, type(None)),
    "max_tokens": (int,),
    "temperature": (int, float),
    "seed": (int, type(None)),
}


class RequestFileError(ValueError):
    pass


def read_requests(path: str | Path) -> list[Request]:
    """Every request of a JSONL file; one bad line fails the whole file, naming the line."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                requests.append(_parse(line, f"{path}:{number}"))
    if not requests:
        raise RequestFileError(f"{path} holds no requests")
    return requests


def _parse(line: str, where: str) -> Request:
    try:
        data = bounded_json.loads(line)
    except json.JSONDecodeError as e:
        raise RequestFileError(f"{where}: not valid JSON ({e.msg})") from None
    except bounded_json.NestedTooDeeply as e:
        raise RequestFileError(f"{where}: {e}") from None
    if not isinstance(data, dict):
        raise RequestFileError(f"{where}: a request is a JSON object")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise RequestFileError(f"{where}: unknown fields {unknown}; accepted: {sorted(_FIELDS)}")
    for key, value in data.items():
        if not isinstance(value, _FIELDS[key]) or isinstance(value, bool):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in _FIELDS[key])
            raise RequestFileError(f"{where}: {key} must be {names}, got {value!r}")
    if ("prompt" in data) == ("prompt_token_ids" in data):
        raise RequestFileError(f"{where}: give exactly one of prompt or prompt_token_ids")
    ids = data.get("prompt_token_ids")
    if ids is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestFileError(f"{where}: prompt_token_ids must be a list of integers")
    return Request(**data)
