"""The caller's side of an RL session (`Runtime.open_session`).

Every method is safe from any thread. Each checks its input at once (SpecError: nothing is
queued and the session is unchanged), then its operation reaches the engine at its next
step boundary, after those submitted before it (session.py says how they run). The
`submit_*` methods return a Future at once; the others wait for it.

    session = runtime.open_session(SessionSpec("policy"))
    result = session.forward_backward([Datum(ids, weights)])  # logprobs, loss
    session.optim_step()  # the live weights change in place
    runtime.generate([Request(prompt="...", session=session)])  # samples from them
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

from cotune.engine.finetune_spec import OptimizerSettings
from cotune.engine.session import LiveWeights, Operation, Session, SessionClosed
from cotune.engine.session_spec import (
    Datum,
    ForwardResult,
    LossSpec,
    OptimResult,
    SavedWeights,
    SessionSpec,
    check_examples,
)

CROSS_ENTROPY = LossSpec()


class SessionHandle:
    def __init__(self, session: Session, post: Callable[[Callable[[], None]], None],
                 close: Callable[[SessionHandle], None], vocab_size: int, context: int):
        """`post(command)` runs a command on the engine's thread between steps; `close`
        ends the session there."""
        self._session, self._post, self._close = session, post, close
        self._vocab_size, self._context = vocab_size, context
        self._ended: BaseException | None = None  # what a call on it raises once ended

    @property
    def closed(self) -> bool:
        return self._ended is not None

    @property
    def id(self) -> str:
        return self._session.id

    @property
    def spec(self) -> SessionSpec:
        return self._session.spec

    @property
    def session(self) -> Session:
        """The engine's side (read by the runtime, changed only on the engine's thread)."""
        return self._session

    @property
    def steps(self) -> int:
        """Optimizer steps taken."""
        return self._session.steps

    @property
    def weights_version(self) -> int:
        """The live weights' version: 0 at the start, one more at each OptimStep."""
        return self._session.weights_version

    def live(self) -> LiveWeights:
        """The weights a request submitted now samples from (SessionClosed once closed, or
        EngineStopped once the runtime stopped)."""
        self._check_open()
        return self._session.live

    def submit_forward_backward(self, data: list[Datum], loss: LossSpec = CROSS_ENTROPY
                                ) -> Future:
        data = list(data)
        check_examples(data, loss, self._vocab_size, self._context)
        return self._submit(Operation("forward_backward", data=data, loss=loss))

    def submit_forward(self, data: list[Datum]) -> Future:
        data = list(data)
        check_examples(data, None, self._vocab_size, self._context)
        return self._submit(Operation("forward", data=data))

    def submit_optim_step(self, settings: OptimizerSettings | None = None) -> Future:
        return self._submit(Operation("optim_step", settings=settings))

    def submit_save(self) -> Future:
        return self._submit(Operation("save"))

    def forward_backward(self, data: list[Datum], loss: LossSpec = CROSS_ENTROPY,
                         timeout: float | None = None) -> ForwardResult:
        """Per-token logprobs and the loss of `data`; the gradients add to the session's."""
        return self.submit_forward_backward(data, loss).result(timeout)

    def forward(self, data: list[Datum], timeout: float | None = None) -> ForwardResult:
        """Per-token logprobs of `data` under the live weights; no gradients."""
        return self.submit_forward(data).result(timeout)

    def optim_step(self, settings: OptimizerSettings | None = None,
                   timeout: float | None = None) -> OptimResult:
        """AdamW over the accumulated gradients (`settings`, or the session's defaults); the
        live weights change in place, and the gradients start again from zero."""
        return self.submit_optim_step(settings).result(timeout)

    def save(self, timeout: float | None = None) -> SavedWeights:
        """The live weights as a PEFT adapter (a copy), with their provenance."""
        return self.submit_save().result(timeout)

    def close(self) -> None:
        """Ends the session: operations not done fail with SessionClosed; its weights leave
        their slot once no request samples from them."""
        if not self.closed:
            self.ended(SessionClosed(f"session {self.id} is closed"))
            self._close(self)

    def ended(self, error: BaseException) -> None:
        """Marks the session ended (closed, or its runtime stopped): calls raise `error`."""
        self._ended = self._ended or error

    def _submit(self, operation: Operation) -> Future:
        self._check_open()
        self._post(lambda: self._session.submit(operation))
        return operation.future

    def _check_open(self) -> None:
        if self._ended is not None:
            raise type(self._ended)(str(self._ended))
