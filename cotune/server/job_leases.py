"""The leases of a worker's jobs in the registry: a thread that, every third of `lease_s`,
renews the leases of the jobs running here, hands back those this worker no longer holds
(another worker took one over, or a cancel from another worker ended it) and claims the jobs
whose owner's lease ended (a worker dead, or cut off from the registry that long)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cotune.adapters.registry import JobRecord, Registry, RegistryUnavailable

log = logging.getLogger("cotune.server")


class JobLeases:
    def __init__(self, registry: Registry, worker_id: str, lease_s: float,
                 running: Callable[[], list[str]], lost: Callable[[str], None],
                 claimed: Callable[[JobRecord], None]):
        """`running()`: the ids of the jobs running here; `lost(job_id)` and
        `claimed(record)`: called on the leases' thread."""
        self.registry, self.worker_id, self.lease_s = registry, worker_id, lease_s
        self._running, self._lost, self._claimed = running, lost, claimed
        # when the leases this worker last took or renewed end: past it, another worker may
        # own its jobs, and their files are no longer this worker's to write
        self._held_until = self.until()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-leases", daemon=True)

    def until(self) -> float:
        """When a lease taken or renewed now ends."""
        return time.time() + self.lease_s

    def holds(self) -> bool:
        """Whether the leases this worker last renewed still hold (a worker cut off from the
        registry, or too busy to renew, no longer knows that its jobs are its own)."""
        return time.time() < self._held_until

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def renew_and_claim(self) -> None:
        now = time.time()
        lost = self.registry.renew_leases(self.worker_id, self._running(), now + self.lease_s)
        self._held_until = now + self.lease_s
        claimed = self.registry.claim_expired_jobs(self.worker_id, now, now + self.lease_s)
        for job_id in lost:
            self._lost(job_id)
        for record in claimed:
            log.info("taking over %s, whose owner's lease ended", record.id)
            self._claimed(record)

    def _run(self) -> None:
        while not self._stopped.wait(self.lease_s / 3):
            try:
                self.renew_and_claim()
            except RegistryUnavailable as e:  # past the lease, others may take the jobs over
                log.warning("job leases not renewed: %s", e)
            except Exception:  # noqa: BLE001 - the leases must be renewed again next time
                log.exception("renewing job leases failed")
