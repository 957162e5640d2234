"""The handle of a fine-tuning job: its state, its metrics, waiting and cancelling."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

from cotune.engine.trainer import Trainer


class JobState(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobFailed(RuntimeError):
    """The job stopped on an error; its versions published so far stay valid."""


class Job:
    def __init__(self, job_id: str, trainer: Trainer, cancel: Callable[[Job], None]):
        self.id, self.trainer, self._cancel = job_id, trainer, cancel
        self.state = JobState.RUNNING
        self.error: BaseException | None = None
        self._done = threading.Event()

    @property
    def name(self) -> str:
        return self.trainer.spec.name

    @property
    def versions(self) -> list[str]:
        """Published versions as adapter names: `name@v1`, `name@v2`, ..."""
        return [f"{self.name}@v{k}" for k in self.trainer.versions]

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

    def cancel(self) -> None:
        """Stops training after the current step; published versions stay."""
        if not self._done.is_set():
            self._cancel(self)

    def _end(self, state: JobState, error: BaseException | None = None) -> None:
        self.state, self.error = state, error
        self._done.set()
