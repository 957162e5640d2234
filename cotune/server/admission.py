"""Admission control for generations: the server-wide queue bound and each tenant's
queued-request and tokens-per-minute quotas. A refusal is immediate (RESOURCE_EXHAUSTED with
the limit it hit), so ten times the admitted load costs the server next to nothing."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from contextlib import contextmanager

import grpc

from cotune.adapters.registry import TenantRecord
from cotune.server.errors import RpcError

WINDOW_S = 60.0


class Rejected(RpcError):
    """A generation refused at admission; `reason` is one of metrics.REJECTION_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.reason = reason


class Admission:
    def __init__(self, max_queued_requests: int):
        self.max_queued = max_queued_requests
        self._lock = threading.Lock()
        self._queued: Counter[str] = Counter()
        self._tokens: dict[str, deque[tuple[float, int]]] = {}  # tenant -> (time, tokens)

    @contextmanager
    def request(self, tenant: TenantRecord, prompt_tokens: int):
        """Holds a place for one generation while the block runs, or raises."""
        quotas, name = tenant.quotas, tenant.name
        with self._lock:
            total = sum(self._queued.values())
            if self.max_queued and total >= self.max_queued:
                raise Rejected("server_queue",
                               f"the server has {total} generations in flight, its limit "
                               "(--max-queued-requests); retry with backoff")
            if quotas.max_queued_requests and self._queued[name] >= quotas.max_queued_requests:
                raise Rejected("tenant_queue",
                               f"tenant {name!r} has {self._queued[name]} generations in "
                               f"flight, its quota max_queued_requests="
                               f"{quotas.max_queued_requests}; wait for one to finish")
            used = self._used(name)
            if quotas.max_tokens_per_minute and used >= quotas.max_tokens_per_minute:
                raise Rejected("tokens_per_minute",
                               f"tenant {name!r} used {used} tokens in the last minute, its "
                               f"quota max_tokens_per_minute={quotas.max_tokens_per_minute}; "
                               "retry later")
            self._queued[name] += 1
        self.count_tokens(name, prompt_tokens)
        try:
            yield
        finally:
            with self._lock:
                self._queued[name] -= 1
                if not self._queued[name]:
                    del self._queued[name]

    def count_tokens(self, tenant: str, tokens: int) -> None:
        with self._lock:
            self._tokens.setdefault(tenant, deque()).append((time.monotonic(), tokens))

    def _used(self, tenant: str) -> int:
        window = self._tokens.get(tenant)
        if not window:
            return 0
        horizon = time.monotonic() - WINDOW_S
        while window and window[0][0] < horizon:
            window.popleft()
        return sum(n for _, n in window)


class OpenStreams:
    """The calls a client can hold open as long as it likes (adapter uploads and exports, job
    watches) share a bound of their own, below the server's rpc threads, so that unary calls
    and health checks always find a thread however many of these are open. Past the bound a
    call is refused at once."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"--max-open-streams must be at least 1, got {limit}")
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)
        # Called as on_refused(tenant) for each call refused here: the server's metrics.
        self.on_refused: Callable[[str], None] | None = None

    @contextmanager
    def hold(self, tenant: str):
        """A place for one call of `tenant` while the block runs, or RESOURCE_EXHAUSTED."""
        if not self._free.acquire(blocking=False):
            if self.on_refused is not None:
                self.on_refused(tenant)
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the server has {self.limit} uploads, exports and job watches open, "
                           "its limit (--max-open-streams); retry with backoff")
        try:
            yield
        finally:
            self._free.release()
