"""Each request's adapter on its way to a device slot: its disk->host load starts when the
request is prepared, in the background; its slot is pinned when the scheduler is about to run
the request, and let go when the request ends or is preempted. A request whose adapter failed
to load, is quarantined, or cannot be placed (it is quarantined then) is refused alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

from cotune.adapters.peft_format import LoraAdapter
from cotune.adapters.residency import ResidentAdapters
from cotune.engine.containment import Quarantine
from cotune.engine.scheduler import Admission
from cotune.engine.sequence import Sequence

IDLE_WAIT_S = 0.005  # a step with nothing to compute waits this long at most for a load


class AdapterAdmission:
    def __init__(self, adapters: ResidentAdapters, quarantine: Quarantine):
        self.adapters, self.quarantine = adapters, quarantine
        # Called as on_refused(seq, error) when a request cannot be admitted for its adapter:
        # it ends with `error` (the scheduler drops it).
        self.on_refused: Callable[[Sequence, BaseException], None] | None = None

    def start_load(self, seq: Sequence, adapter: str | Path | LoraAdapter) -> None:
        """Starts loading `seq`'s adapter from its PEFT directory (`seq.adapter_load`);
        weights in memory (an RL session's live version) are loaded already."""
        if isinstance(adapter, LoraAdapter):
            seq.adapter_load = Future()
            seq.adapter_load.set_result(adapter)
        else:
            seq.adapter_load = self.adapters.prefetch(seq.adapter, adapter)

    def admit(self, seq: Sequence) -> Admission:
        """Called by the scheduler when `seq` is about to run: pins its adapter in a slot."""
        if seq.adapter is None or seq.slot is not None:
            return Admission.READY
        load = seq.adapter_load
        if load.done() and load.exception() is not None:
            return self._refuse(seq, load.exception())
        if seq.adapter in self.quarantine:
            return self._refuse(seq, self.quarantine.error(seq.adapter))
        try:
            seq.slot = self.adapters.try_acquire(seq.adapter, load)
        except Exception as e:  # noqa: BLE001 - this adapter alone
            return self._refuse(seq, self.quarantine.add(
                seq.adapter, f"it could not be placed in a device slot ({e})"))
        if seq.slot is not None:
            return Admission.READY
        return Admission.NO_SLOT if load.done() else Admission.LOADING

    def release(self, seq: Sequence) -> None:
        """Unpins the slot of a sequence that ended or was preempted."""
        if seq.slot is not None:
            self.adapters.release(seq.adapter)
            seq.slot = None

    def await_loads(self, waiting: Iterable[Sequence]) -> None:
        """Called by a step with nothing to compute: waits a little for an adapter that
        `waiting` requests need, so that the caller's loop does not spin against the loader
        thread (briefly: a request that needs no load may arrive meanwhile)."""
        loads = [s.adapter_load for s in waiting
                 if s.adapter_load is not None and not s.adapter_load.done()]
        if loads:
            wait(loads, timeout=IDLE_WAIT_S, return_when=FIRST_COMPLETED)

    def _refuse(self, seq: Sequence, error: BaseException) -> Admission:
        if self.on_refused is not None:
            self.on_refused(seq, error)
        return Admission.FAILED
