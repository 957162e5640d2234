"""What a failure of one adapter or one request costs: those requests, and that adapter,
never the engine.

An adapter can pass every check and still turn its rows' outputs into overflow, and a step's
forward can fail on one adapter's slot. The engine then fails the rows it can trace the fault
to, quarantines their adapter (it refuses further requests, saying why) and goes on serving
everyone else (`Containment.contain`). Non-finite logits for a row are such a fault.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from cotune.engine.example_pieces import TrainingWork
from cotune.engine.forwarded import Forwarded
from cotune.engine.scheduler import ScheduledChunk, Scheduler
from cotune.engine.sequence import Sequence
from cotune.model.llama import CausalLM, ForwardBatch


class RequestFailed(RuntimeError):
    """The engine failed this request alone (its rows' outputs, or a pass over them, failed);
    the message says why. Other requests go on."""


class AdapterQuarantined(RuntimeError):
    """The adapter failed a step and was taken out of service on this server; the message
    says why and what to do."""


class Quarantine:
    """The adapters taken out of service, by engine key, each with its reason. Written by the
    engine thread, read by any thread (single dict operations)."""

    def __init__(self):
        self._reasons: dict[str, str] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._reasons

    def add(self, key: str, reason: str) -> AdapterQuarantined:
        """Takes the adapter out of service; returns the error its requests end with."""
        self._reasons[key] = reason
        return self.error(key)

    def check(self, key: str) -> None:
        """Refuses a request for a quarantined adapter."""
        if key in self._reasons:
            raise self.error(key)

    def error(self, key: str) -> AdapterQuarantined:
        return AdapterQuarantined(
            f"adapter {key!r} is quarantined on this server: {self._reasons[key]}; its "
            "requests are refused: serve a new version with finite, moderate weights and "
            "lora_alpha")


class Containment:
    """What the engine does with a fault: fails the requests it traces it to, alone, and
    quarantines their adapter. Runs on the engine's thread."""

    def __init__(self, model: CausalLM, scheduler: Scheduler, quarantine: Quarantine,
                 forward: Callable[[list[ScheduledChunk], TrainingWork | None], Forwarded],
                 abort: Callable[[Sequence], None]):
        """`forward`: the engine's pass over served chunks and training rows, which samples
        the served rows (Engine._forward); `abort`: ends a queued or running request and
        lets go of what it holds (Engine.abort)."""
        self.model, self.scheduler, self.quarantine = model, scheduler, quarantine
        self._forward, self._abort = forward, abort
        # Called as on_failure(seq, error) when the engine fails a request alone (its adapter
        # failed to load or to run, or its outputs were not finite); other requests go on.
        self.on_failure: Callable[[Sequence, BaseException], None] | None = None

    def contain(self, chunks: list[ScheduledChunk], work: TrainingWork | None,
                error: Exception) -> tuple[Forwarded, Exception | None]:
        """A step's pass failed. Each adapter's served rows, and the training rows, run
        again apart (nothing of the failed pass was committed: a row's keys and values are
        written again, the same): what fails again fails alone, its adapter quarantined,
        and the rest of the step goes on. Where the base model itself fails a pass of one
        token, the fault is no one row's, and `error` is raised: the engine stops.
        Returns the pass, and the error of the training rows' pass where it failed again
        (their work failed alone: the engine tells whose it was), else None."""
        try:
            with torch.no_grad():
                self.model(ForwardBatch(torch.zeros(1, dtype=torch.int64), [1]))
        except Exception:
            raise error from None
        outputs = []
        for _, group in itertools.groupby(chunks, key=lambda c: c.seq.adapter):
            group = list(group)
            try:
                outputs += self._forward(group, None).outputs
            except Exception as e:  # noqa: BLE001 - these rows alone
                self.fail_rows([c.seq for c in group], f"a step over its rows failed ({e!r})")
        training, training_error = Forwarded([], None, None, 0.0), None
        if work is not None:
            try:
                training = self._forward([], work)
            except Exception as e:  # noqa: BLE001 - the training rows alone
                training_error = e
        return Forwarded(outputs, training.training_hidden, training.batch,
                         training.seconds), training_error

    def fail_rows(self, seqs: list[Sequence], reason: str) -> None:
        """Fails requests whose rows failed, and quarantines their adapter: its requests
        waiting or running fail too, and new ones are refused."""
        for seq in seqs:
            if seq.adapter is None:
                self._fail(seq, RequestFailed(f"request {seq.id!r} failed: {reason}"))
            elif seq.adapter not in self.quarantine:
                quarantined = self.quarantine.add(seq.adapter, reason)
                for other in [*self.scheduler.running, *self.scheduler.waiting]:
                    if other.adapter == seq.adapter:
                        self._fail(other, quarantined)
            if not seq.is_finished:
                self._fail(seq, self.quarantine.error(seq.adapter))

    def report_failure(self, seq: Sequence, error: BaseException) -> None:
        """Marks `seq` ended with `error`, and reports it (`on_failure`): a request out of
        the scheduler already, or one it drops (Admission.FAILED)."""
        seq.finish_reason = "error"
        if self.on_failure is not None:
            self.on_failure(seq, error)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        """Ends a queued or running request with `error`; the engine goes on."""
        self._abort(seq)
        self.report_failure(seq, error)


def non_finite_rows(logits: torch.Tensor) -> list[int]:
    """The rows of `logits` (rows, vocab) with a NaN or an infinity. A row's sum is not finite
    when one of its logits is not (NaN and opposite infinities give NaN), so the sums find
    the suspects, 20 times faster than testing every logit, and only they are tested one by
    one (a sum of finite logits can overflow)."""
    suspects = (~torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))).nonzero().flatten()
    if not len(suspects):
        return []
    finite = torch.isfinite(logits[suspects]).all(dim=-1)
    return suspects[~finite].tolist()
