"""Admission control for generations: the server-wide queue bound and each tenant's
queued-request and tokens-per-minute quotas. A refusal is immediate (RESOURCE_EXHAUSTED with
the limit it hit), so ten times the admitted load costs the server next to nothing.

Tokens per minute count the cluster's: the tokens admitted here in the last minute, plus what
the other workers last reported (`elsewhere`, which usage_exchange keeps current)."""

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
        self.elsewhere: dict[str, int] = {}  # tenant -> tokens of the last minute on others

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
            here, elsewhere = self._used(name), self.elsewhere.get(name, 0)
            if quotas.max_tokens_per_minute and here + elsewhere >= quotas.max_tokens_per_minute:
                raise Rejected("tokens_per_minute",
                               f"tenant {name!r} used {here + elsewhere} tokens in the last "
                               f"minute ({elsewhere} of them on other workers), its quota "
                               f"max_tokens_per_minute={quotas.max_tokens_per_minute}; retry "
                               "later")
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

    def used_here(self) -> dict[str, int]:
        """Tenant -> tokens admitted on this worker in the last minute."""
        with self._lock:
            return {tenant: used for tenant in list(self._tokens)
                    if (used := self._used(tenant))}

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
    and health checks always find a thread however many of these are open. Within it, each
    tenant holds at most `per_tenant` at once, so that one tenant cannot shut out the others,
    and the last place is kept for admins: tenants that are not admins fill at most
    `limit - 1`, so an admin can always open one (to export, or to watch a job). Past a bound
    a call is refused at once."""

    def __init__(self, limit: int, per_tenant: int | None = None):
        if limit < 2:
            raise ValueError(f"--max-open-streams must be at least 2 (one place is kept for "
                             f"admins), got {limit}")
        per_tenant = default_per_tenant(limit) if per_tenant is None else per_tenant
        if not 1 <= per_tenant <= limit:
            raise ValueError(f"--max-open-streams-per-tenant must be from 1 to "
                             f"--max-open-streams ({limit}), got {per_tenant}")
        self.limit, self.per_tenant = limit, per_tenant
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()  # tenant -> its calls held open
        # Called as on_refused(tenant, protocol) for each call refused here: the server's
        # metrics.
        self.on_refused: Callable[[str, str], None] | None = None

    @contextmanager
    def hold(self, tenant: TenantRecord, protocol: str):
        """A place for one call of `tenant` while the block runs, or RESOURCE_EXHAUSTED;
        `protocol` is only counted (metrics.PROTOCOLS)."""
        name = tenant.name
        with self._lock:
            refusal = self._refusal(tenant)
            if refusal is None:
                self._open[name] += 1
        if refusal is not None:
            if self.on_refused is not None:
                self.on_refused(name, protocol)
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        try:
            yield
        finally:
            with self._lock:
                self._open[name] -= 1
                if not self._open[name]:
                    del self._open[name]

    def _refusal(self, tenant: TenantRecord) -> str | None:
        """Why a new call of `tenant` finds no place, or None when it has one."""
        held = self._open[tenant.name]
        if held >= self.per_tenant:
            return (f"tenant {tenant.name!r} has {held} uploads, exports and job watches open, "
                    "its limit (--max-open-streams-per-tenant); finish or cancel one of them "
                    "first")
        total = sum(self._open.values())
        if total < (self.limit if tenant.admin else self.limit - 1):
            return None
        kept = "" if tenant.admin else ", less the place kept for admins"
        return (f"the server has {total} uploads, exports and job watches open, its limit "
                f"(--max-open-streams{kept}); retry with backoff")


def default_per_tenant(limit: int) -> int:
    """--max-open-streams-per-tenant when not given: a quarter of --max-open-streams."""
    return max(1, limit // 4)
