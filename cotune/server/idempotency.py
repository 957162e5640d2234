"""The idempotency key of a creating call (CreateAdapter, CreateJob), with the fingerprint of
its request that a retry must match: the request's deterministic bytes, hashed."""

from __future__ import annotations

import hashlib

from google.protobuf.message import Message

from cotune.adapters.registry import Idempotency


def idempotency(key: str, request: Message) -> Idempotency | None:
    """None when the caller sent no key; ValueError for a malformed one."""
    if not key:
        return None
    return Idempotency(key, hashlib.sha256(request.SerializeToString(deterministic=True))
                       .hexdigest())
