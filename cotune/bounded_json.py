"""json.loads for JSON that users send, with a bound on how deeply it nests.

Python's parser recurses once per level of arrays and objects and raises RecursionError at about
a thousand levels, an error no caller expects (a server turned it into INTERNAL); a value just
under that depth passes the parser and then fails the next recursive use of it (repr,
json.dumps). Values nested deeper than MAX_DEPTH are refused with a ValueError instead.
Standard library only, so that every layer of cotune can use it.
"""

from __future__ import annotations

import json

# Levels of arrays and objects: adapter configs, training examples and request lines use fewer
# than ten.
MAX_DEPTH = 100


class NestedTooDeeply(ValueError):
    """JSON nested deeper than MAX_DEPTH; the message says what is accepted."""


def loads(text: str | bytes):
    """json.loads(text), refusing a value nested deeper than MAX_DEPTH with NestedTooDeeply."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise _too_deep() from None
    if _nests_deeper_than(value, MAX_DEPTH):
        raise _too_deep()
    return value


def _too_deep() -> NestedTooDeeply:
    return NestedTooDeeply(f"JSON nested too deeply (more than {MAX_DEPTH} levels of arrays and "
                           f"objects); accepted: at most {MAX_DEPTH} levels")


def _nests_deeper_than(value, limit: int) -> bool:
    # iterative: a deep value must not exhaust the stack here either
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in item)
    return False
