"""Every few seconds, this worker's tokens per tenant of the last minute go to the registry and
the other workers' come back into admission, so that max_tokens_per_minute holds across the
workers of one registry (Registry.exchange_token_usage says how closely)."""

from __future__ import annotations

import logging
import threading
import time

from cotune.adapters.registry import Registry, RegistryUnavailable
from cotune.server.admission import Admission

log = logging.getLogger(__name__)


class UsageExchange:
    def __init__(self, registry: Registry, admission: Admission, worker: str,
                 interval_s: float = 5.0):
        self.registry, self.admission, self.worker = registry, admission, worker
        self.interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-exchange", daemon=True)
        self._thread.start()

    def exchange(self) -> None:
        try:
            self.admission.elsewhere = self.registry.exchange_token_usage(
                self.worker, self.admission.used_here(), time.time())
        except RegistryUnavailable as e:  # the last counts stand until the database is back
            log.warning("tokens per minute not exchanged: %s", e)
        except Exception:  # noqa: BLE001 - the exchange goes on at its next turn
            log.exception("exchanging tokens per minute failed")

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self.exchange()
