"""When the SDK tries a call again: on UNAVAILABLE only (the server is down, restarting or
draining), after an exponential backoff with jitter, at most `retries` more times."""

from __future__ import annotations

import random
from collections.abc import Iterator

import grpc

from cotune.client.errors import from_rpc_error

FIRST_DELAY_S = 0.1
MAX_DELAY_S = 2.0


def backoff(retries: int) -> Iterator[float | None]:
    """One item per attempt: the seconds to wait before the next attempt, None for the last.

    The delays double from 0.1 s up to 2 s; each is drawn from [d/2, d] so that clients that
    failed together do not come back together."""
    for attempt in range(retries):
        delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** attempt)
        yield random.uniform(delay / 2, delay)
    yield None


def retry_delay(error: grpc.RpcError, delay: float | None) -> float:
    """The seconds to wait before trying again after `error` (`delay` from `backoff`, None when
    no attempt is left); raises the error as a CotuneError when it is not to be retried."""
    if delay is None or error.code() != grpc.StatusCode.UNAVAILABLE:
        raise from_rpc_error(error) from None
    return delay
