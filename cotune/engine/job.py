"""The handle of a fine-tuning job: its state, its metrics, its events, waiting and
cancelling."""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cotune.adapters.peft_format import LoraAdapter
from cotune.engine.broadcast import Broadcast
from cotune.engine.trainer import Trainer


class JobState(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class JobEvent:
    """What a running job reports, in order:
    "progress" after each optimizer step: step, total_steps, loss, tokens;
    "checkpoint" when a version is published: version, path, step, metrics, adapter (its
        weights, a LoraAdapter copy);
    "state" once, last: state (a JobState), error (str or None)."""

    kind: str
    data: dict
    time: float = field(default_factory=time.time)


class JobFailed(RuntimeError):
    """The job stopped on an error; its versions published so far stay valid."""


class Job:
    def __init__(self, job_id: str, trainer: Trainer, cancel: Callable[[Job], None],
                 serve_by_name: bool = True):
        self.id, self.trainer, self._cancel = job_id, trainer, cancel
        self.serve_by_name = serve_by_name  # whether the runtime serves versions as name@vK
        self.state = JobState.RUNNING
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._events = Broadcast()
        self._reported_step = trainer.step
        # the versions published: those it resumed after, then each as it is announced (a
        # trainer on a training lane has saved a version a little before)
        self._versions = list(trainer.versions)

    @property
    def name(self) -> str:
        return self.trainer.spec.name

    @property
    def versions(self) -> list[str]:
        """Published versions as the trainer numbers them: `name@v1`, `name@v2`, ... (the
        runtime's names for them when `serve_by_name`)."""
        return [f"{self.name}@v{k}" for k in self._versions]

    @property
    def metrics(self) -> dict:
        t = self.trainer
        return {"step": t.step, "total_steps": t.total_steps, "tokens": t.tokens,
                "loss": t.losses[-1] if t.losses else None, "losses": list(t.losses),
                "versions": self.versions, **{k: v for k, v in t.metrics.items()
                                              if k != "train_loss"}}

    def wait(self, timeout: float | None = None) -> Job:
        """Blocks until the job ends; raises JobFailed if it failed, TimeoutError on timeout."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} still {self.state.value} after {timeout} s")
        if self.state is JobState.FAILED:
            raise JobFailed(f"job {self.id} ({self.name}) failed: {self.error}") from self.error
        return self

    def subscribe(self) -> queue.Queue:
        """A queue of this job's events from now on, ending with its "state" event and then
        `broadcast.END`; once the job has ended it holds only those two."""
        return self._events.subscribe()

    def unsubscribe(self, events: queue.Queue) -> None:
        self._events.unsubscribe(events)

    def cancel(self) -> None:
        """Stops training at the next step boundary, without waiting for it (`wait` does);
        published versions stay."""
        if not self._done.is_set():
            self._cancel(self)

    def _report_progress(self) -> None:
        """Called by the runtime after each engine step: an event per new optimizer step."""
        t = self.trainer
        if t.step != self._reported_step:
            self._reported_step = t.step
            self._events.publish(JobEvent("progress", {"step": t.step, "total_steps": t.total_steps,
                                             "loss": t.losses[-1] if t.losses else None,
                                             "tokens": t.tokens}))

    def _published(self, version: int, path, adapter: LoraAdapter) -> None:
        self._versions.append(version)
        self._events.publish(JobEvent("checkpoint", {"version": version, "path": path,
                                           "step": self.trainer.step,
                                           "metrics": dict(self.trainer.metrics),
                                           "adapter": adapter}))

    def _end(self, state: JobState, error: BaseException | None = None) -> None:
        self.state, self.error = state, error
        self._done.set()
        self._events.close(JobEvent("state", {"state": state,
                                              "error": None if error is None else str(error)}))
