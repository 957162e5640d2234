"""RL sessions of every tenant on this server: opened in the shared runtime, counted against
each tenant's max_sessions quota, closed by their owner or after `idle_timeout_s` with no call,
and saved as registry versions.

A session lives in this process only (its live weights and optimizer state are the engine's);
its id is unguessable ("sess-" and 128 random bits) and a tenant reaches its own sessions
only: another tenant's id is NotFound, exactly as an id that never existed. A closed session is
remembered for a while (CLOSED_KEPT per tenant, CLOSED_KEPT_S at most), so that its owner hears
why it closed (FailedPrecondition) rather than that it never was.

No lock of the manager is held while an operation runs in the engine: `use` marks the session
busy (the sweeper leaves busy sessions alone) and the operation waits on the engine outside
the lock. The sweeper closes idle sessions on a thread of its own; `create` sweeps the
tenant's first, so that a place an idle session held is free at once.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cotune.adapters.peft_format import AdapterMismatch, save_peft_adapter
from cotune.adapters.registry import (
    FailedPrecondition,
    Idempotency,
    NotFound,
    QuotaExceeded,
    Registry,
    TenantRecord,
    VersionRecord,
)
from cotune.engine.finetune_spec import LoraSettings, OptimizerSettings
from cotune.engine.runtime import Runtime
from cotune.engine.session import SessionClosed
from cotune.engine.session_handle import SessionHandle
from cotune.engine.session_spec import SessionSpec
from cotune.server.job_specs import continued_fields
from cotune.server.names import reference, runtime_key

log = logging.getLogger("cotune.server")
CLOSED_KEPT = 64  # closed sessions remembered per tenant
CLOSED_KEPT_S = 3600.0  # for at most this long


class SessionGone(FailedPrecondition):
    """An operation on a session that is closed; the message says why it closed."""


@dataclass
class LiveSession:
    """A session as the server keeps it: the engine's handle and what the wire shows."""

    id: str
    tenant: str
    adapter: str
    parent: str  # "name@vK" it continues, "" for new weights
    handle: SessionHandle
    spec: SessionSpec
    created: float  # time.time()
    idle_timeout_s: float
    last_used: float  # time.time() of the start or end of its latest call
    busy: int = 0  # calls in the engine now: the sweeper leaves it alone
    versions: list[int] = field(default_factory=list)  # registry versions it saved
    saved: tuple[int, VersionRecord] | None = None  # (weights_version, version) of the last save
    close_reason: str = ""  # "" while open
    closed_at: float = 0.0
    save_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def open(self) -> bool:
        return not self.close_reason

    def gone(self) -> SessionGone:
        return SessionGone(f"session {self.id} is closed ({self.close_reason}); create a new "
                           "session (CreateSession), from a version it saved to keep its weights")


class SessionManager:
    def __init__(self, runtime: Runtime, registry: Registry, staging_dir: Path,
                 idle_timeout_s: float, sharded: bool = False):
        self.runtime, self.registry, self.staging_dir = runtime, registry, staging_dir
        self.idle_timeout_s, self.sharded = idle_timeout_s, sharded
        self._open: dict[str, LiveSession] = {}
        self._opening: dict[str, str] = {}  # id -> tenant: places held while the engine opens
        self._closed: dict[str, OrderedDict[str, LiveSession]] = {}  # tenant -> id -> session
        self._keys: dict[tuple[str, str], tuple[str, str]] = {}  # (tenant, key) -> (fp, id)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the sweeper, which closes sessions idle past the timeout."""
        self._sweeper = threading.Thread(target=self._sweep_forever, daemon=True,
                                         name="session-sweeper")
        self._sweeper.start()

    def stop(self) -> None:
        """Closes every session (the server stops: their weights go with the engine)."""
        self._stop.set()
        self.close_all(None, "the server stopped")

    def close_all(self, tenant: str | None, reason: str) -> None:
        """Closes every open session of `tenant` (None: of every tenant)."""
        with self._lock:
            sessions = [s for s in self._open.values() if tenant in (None, s.tenant)]
        for session in sessions:
            self._close(session, reason)

    def forget_tenant(self, tenant: str) -> None:
        """A deleted tenant's sessions: closed, and forgotten with their idempotency keys (a
        tenant created again under the name starts empty)."""
        self.close_all(tenant, "its tenant was deleted")
        with self._lock:
            self._closed.pop(tenant, None)
            for key in [k for k in self._keys if k[0] == tenant]:
                del self._keys[key]

    def _sweep_forever(self) -> None:
        period = min(max(self.idle_timeout_s / 4, 0.05), 10.0)
        while not self._stop.wait(period):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must outlive one failure
                log.exception("sweeping idle sessions failed")

    def sweep(self, tenant: str | None = None) -> None:
        """Closes the sessions (of `tenant`, or every tenant's) idle past the timeout."""
        now = time.time()
        with self._lock:
            idle = [s for s in self._open.values()
                    if (tenant is None or s.tenant == tenant) and not s.busy
                    and now - s.last_used >= s.idle_timeout_s]
        for session in idle:
            self._close(session, f"idle for more than {session.idle_timeout_s:g} s, the "
                                 "server's --session-idle-timeout")

    # --- calls -------------------------------------------------------------------------------

    def create(self, tenant: TenantRecord, adapter: str, version: int | None, lora: dict,
               optimizer: dict, seed: int, min_share: float,
               idempotency: Idempotency | None = None) -> LiveSession:
        """Opens a session on `adapter`: new weights, or those of `version` of it. Raises
        SpecError (bad settings), NotFound (no such version), QuotaExceeded (max_sessions),
        FailedPrecondition (a sharded base), ValueError (a key reused with another request)."""
        if self.sharded:
            raise FailedPrecondition(
                "RL sessions are not supported on a base sharded over ranks yet; accepted: a "
                "server whose whole base is in one process")
        if idempotency is not None and (earlier := self._repeated(tenant.name, idempotency)):
            return earlier
        parent = None
        if version is not None:
            parent = self.registry.get_version(tenant.name, adapter, version)
            lora = continued_fields(parent, {"lora": lora})["lora"]
        spec = SessionSpec(name=adapter, lora=LoraSettings(**lora),
                           optimizer=OptimizerSettings(**optimizer), seed=seed,
                           tenant=tenant.name, min_share=min_share,
                           init_adapter=None if parent is None else
                           self.registry.version_dir(parent),
                           parent_version=0 if parent is None else parent.version)
        max_rank = self.runtime.engine.config.max_rank
        if spec.lora.rank > max_rank:  # its saved versions could not be served
            raise AdapterMismatch(
                f"rank {spec.lora.rank} exceeds max_rank {max_rank} of this server; lower the "
                f"rank to at most {max_rank} or start the server with --max-rank "
                f"{spec.lora.rank}")
        self.sweep(tenant.name)  # an idle session's place is free now, not at the next sweep
        session_id = "sess-" + secrets.token_hex(16)
        with self._lock:  # the count and the claim of a place are one step
            count = sum(s.tenant == tenant.name for s in self._open.values()) + \
                sum(t == tenant.name for t in self._opening.values())
            limit = tenant.quotas.max_sessions
            if 0 < limit <= count:
                raise QuotaExceeded("max_sessions", (
                    f"tenant {tenant.name!r} has {count} RL sessions open, and its "
                    f"max_sessions quota is {limit}; close one (CloseSession) or ask an "
                    "administrator to raise max_sessions"))
            self._opening[session_id] = tenant.name
        try:
            handle = self.runtime.open_session(spec, session_id=session_id)
        except BaseException:
            with self._lock:
                self._opening.pop(session_id, None)
            raise
        now = time.time()
        session = LiveSession(
            id=session_id, tenant=tenant.name, adapter=adapter,
            parent="" if parent is None else reference(adapter, parent.version),
            handle=handle, spec=spec, created=now, idle_timeout_s=self.idle_timeout_s,
            last_used=now)
        with self._lock:
            self._opening.pop(session_id, None)
            self._open[session_id] = session
            if idempotency is not None:
                self._keys[(tenant.name, idempotency.key)] = (idempotency.fingerprint,
                                                              session_id)
        log.info("session %s opened on %s/%s", session_id, tenant.name, adapter)
        return session

    def _repeated(self, tenant: str, idempotency: Idempotency) -> LiveSession | None:
        with self._lock:
            earlier = self._keys.get((tenant, idempotency.key))
        if earlier is None:
            return None
        fingerprint, session_id = earlier
        if fingerprint != idempotency.fingerprint:
            raise ValueError(f"idempotency key {idempotency.key!r} was used with another "
                             "CreateSession request; use a new key for a new session")
        return self.get(tenant, session_id)

    def get(self, tenant: str, session_id: str) -> LiveSession:
        """The tenant's session, open or lately closed; NotFound otherwise (another tenant's
        too: no call tells whether another tenant's id exists)."""
        with self._lock:
            session = self._open.get(session_id)
            if session is None:
                session = self._closed.get(tenant, {}).get(session_id)
        if session is None or session.tenant != tenant:
            raise NotFound(f"session {session_id[:80]!r} not found; accepted: the id of one of "
                           "your sessions on this server (ListSessions)")
        return session

    def list(self, tenant: str) -> list[LiveSession]:
        """The tenant's open sessions, oldest first."""
        with self._lock:
            sessions = [s for s in self._open.values() if s.tenant == tenant]
        return sorted(sessions, key=lambda s: (s.created, s.id))

    def close(self, tenant: str, session_id: str) -> LiveSession:
        session = self.get(tenant, session_id)
        self._close(session, "closed by CloseSession")
        return session

    @contextmanager
    def use(self, tenant: str, session_id: str):
        """The tenant's open session for one call (SessionGone when it is closed, NotFound when
        it is not the tenant's); busy, so not swept, while the call runs."""
        session = self.get(tenant, session_id)
        with self._lock:
            if not session.open:
                raise session.gone()
            session.busy += 1
            session.last_used = time.time()
        try:
            yield session
        except SessionClosed:
            raise session.gone() from None
        finally:
            with self._lock:
                session.busy -= 1
                session.last_used = time.time()

    def save(self, session: LiveSession, timeout: float | None) -> VersionRecord:
        """Publishes the session's live weights as the next version of its adapter; weights
        already saved answer the version they became. The caller holds `use`."""
        with session.save_lock:  # two saves of one session publish one version
            saved = session.handle.save(timeout=timeout)
            if session.saved is not None and session.saved[0] == saved.weights_version:
                return session.saved[1]
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            files = self.staging_dir / f"{session.id}-{secrets.token_hex(4)}"
            try:
                save_peft_adapter(saved.adapter, files)
                record = self.registry.publish_version(session.tenant, session.adapter, files,
                                                       saved.provenance)
            finally:
                shutil.rmtree(files, ignore_errors=True)
            # its first request (Generate on the version) reads no file
            self.runtime.cache_adapter(runtime_key(session.tenant, session.adapter,
                                                   record.version), saved.adapter)
            session.saved = (saved.weights_version, record)
            session.versions.append(record.version)
            return record

    def _close(self, session: LiveSession, reason: str) -> None:
        with self._lock:
            if not session.open:
                return
            session.close_reason, session.closed_at = reason, time.time()
            self._open.pop(session.id, None)
            closed = self._closed.setdefault(session.tenant, OrderedDict())
            closed[session.id] = session
            self._forget_closed(closed, session.closed_at)
        try:
            session.handle.close()
        except Exception:  # noqa: BLE001 - the place is freed whatever the engine says
            log.exception("closing session %s in the engine failed", session.id)
        log.info("session %s of %s closed: %s", session.id, session.tenant, reason)

    def _forget_closed(self, closed: OrderedDict, now: float) -> None:
        """Under the lock: drops the oldest closed sessions past CLOSED_KEPT or CLOSED_KEPT_S,
        with their idempotency keys."""
        while closed:
            oldest = next(iter(closed.values()))
            if len(closed) <= CLOSED_KEPT and now - oldest.closed_at < CLOSED_KEPT_S:
                return
            closed.popitem(last=False)
            for key, (_, session_id) in list(self._keys.items()):
                if session_id == oldest.id:
                    del self._keys[key]

