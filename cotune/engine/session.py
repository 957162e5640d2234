"""An RL session inside the engine: a live adapter, its AdamW, and the operations its caller
asked for (ForwardBackward, Forward, OptimStep, Save), run in order in the engine's steps.

The engine plans a session's examples as it plans a job's, in the room the serving SLOs
leave and token by token where an example is long (example_pieces.py). Operations take effect
in the order they were submitted: the examples of consecutive ForwardBackward and Forward
calls share steps (their gradients add up, in any order), and an OptimStep or a Save waits
until every operation before it is done, then runs at once, between two steps. So a Forward
after an OptimStep sees the new weights, and every example of one call runs with one weights
version.

Each OptimStep makes a new weights version, `live`: a copy of the weights that the engine
places in a device slot under a key of its own. A request samples from the version that is
live when it is submitted, and keeps it to its last token (its slot stays pinned); a request
submitted after OptimStep returned samples from the new weights. Nothing is written to disk.

Every method runs on the engine's thread.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cotune.adapters.peft_format import LoraAdapter
from cotune.engine.example_pieces import Cost, ExamplePieces, ExampleRun, TrainingWork
from cotune.engine.finetune_spec import OptimizerSettings
from cotune.engine.live_lora import load_lora_weights, lora_snapshot, new_lora
from cotune.engine.session_spec import (
    Datum,
    ForwardResult,
    LossSpec,
    OptimResult,
    SavedWeights,
    SessionSpec,
)
from cotune.model.llama import CausalLM
from cotune.model.training_rows import TrainingRows


class SessionClosed(RuntimeError):
    """The session was closed (by its caller, or idle too long): it takes no more work."""


class SessionFailed(RuntimeError):
    """An operation failed in the engine; the session goes on (the message says what was
    discarded)."""


@dataclass(frozen=True)
class LiveWeights:
    """A weights version of a session: the key its slot is resident under, and the weights
    (a copy, never changed)."""

    key: str
    version: int
    adapter: LoraAdapter


@dataclass(eq=False)
class Operation:
    """One call of the session's caller, with the Future its result goes to."""

    kind: str  # "forward_backward", "forward", "optim_step" or "save"
    future: Future = field(default_factory=Future)
    data: list[Datum] = field(default_factory=list)
    loss: LossSpec | None = None  # forward_backward's
    settings: OptimizerSettings | None = None  # optim_step's; None: the session's defaults
    started: int = 0  # examples started
    runs: list[ExampleRun] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    loss_sum: float = 0.0
    version: int = 0  # the weights version its examples ran with

    @property
    def computes(self) -> bool:
        return self.kind in ("forward_backward", "forward")

    @property
    def complete(self) -> bool:
        return self.started == len(self.data) and all(run.finished for run in self.runs)


class Session:
    # What the engine asks of it (TrainsInSteps). Never on a training lane: its caller waits
    # on each operation, and OptimStep changes the weights between two steps.
    may_train_on_lane = False

    def __init__(self, spec: SessionSpec, model: CausalLM, session_id: str,
                 base_fingerprint: str = ""):
        """Reads `spec.init_adapter`'s files when it has one (AdapterError when they do not
        fit the spec's rank and targets on this base)."""
        self.spec, self.model, self.id = spec, model, session_id
        self.base_fingerprint = base_fingerprint
        self.lora = new_lora(spec.lora, spec.seed, model)
        if spec.init_adapter is not None:
            load_lora_weights(self.lora, spec.lora, model, Path(spec.init_adapter))
        opt = spec.optimizer
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=opt.lr, betas=opt.betas,
                                           eps=opt.eps, weight_decay=opt.weight_decay)
        self.last_settings = opt
        self.pieces = ExamplePieces(model, self.lora, self._next_run)
        self.steps = 0  # optimizer steps taken
        self.live = self._snapshot(0)
        # Called as on_weights(session, previous key) once a new version is live: the engine
        # places it in a slot, and lets go of the previous one.
        self.on_weights: Callable[[Session, str], None] | None = None
        self._operations: deque[Operation] = deque()
        self._closed: BaseException | None = None
        # What the engine reads of anything it trains in its steps (TrainsInSteps).
        self.awaiting_ranks = self.checkpoint_requested = self.done = False

    @property
    def weights_version(self) -> int:
        return self.live.version

    @property
    def has_work(self) -> bool:
        """Whether examples of its operations wait for the steps to come (an OptimStep or a
        Save needs no step: it runs between two)."""
        return any(op.computes and not op.complete for op in self._operations)

    def submit(self, operation: Operation) -> None:
        """Queues an operation after those before it (it runs at once when nothing is ahead
        of it and it computes nothing)."""
        if self._closed is not None:
            operation.future.set_exception(self._closed)
            return
        self._operations.append(operation)
        self._settle()

    def close(self, error: BaseException) -> None:
        """Fails every operation not done with `error`, and takes no more."""
        self._closed = error
        while self._operations:
            self._operations.popleft().future.set_exception(error)
        self.pieces.runs.clear()

    def plan(self, seconds: float, cost: Cost, max_tokens: int, split: bool = True,
             at_least_one: bool = False) -> TrainingWork:
        """The examples' work that fits in `seconds` by `cost` (ExamplePieces.plan)."""
        work = TrainingWork()
        self.pieces.plan(work, seconds, cost, max_tokens, split, at_least_one)
        return work

    def run(self, work: TrainingWork, hidden: torch.Tensor | None,
            logits: Callable[[torch.Tensor], torch.Tensor], rows: TrainingRows | None,
            evaluate_at_once: bool = False) -> None:
        """After the step's forward pass: losses, logprobs and backward of the session's
        rows; then the operations that are done are answered, and an OptimStep or Save that
        waited for them runs. A loss that is not finite fails the operations that share the
        gradients (`discard`)."""
        try:
            self.pieces.train(work, hidden, logits, rows)
        except FloatingPointError as error:
            self.discard(error)
        self._settle()

    def discard(self, error: BaseException) -> None:
        """An operation failed: the gradients accumulated since the last OptimStep are
        dropped, and with them every operation not yet answered before the next OptimStep
        (the weights do not change)."""
        failed = SessionFailed(f"session {self.id}: {error}; the gradients accumulated since "
                               "the last optim_step were discarded, and the calls not yet "
                               "answered before the next optim_step failed")
        while self._operations and self._operations[0].computes:
            self._operations.popleft().future.set_exception(failed)
        self.pieces.runs.clear()
        self.optimizer.zero_grad(set_to_none=True)

    def work_failed(self, error: BaseException) -> bool:
        """The session goes on: the failed work is discarded (`discard`)."""
        self.discard(error)
        return False

    def _settle(self) -> None:
        """Answers the computing operations that are done, and runs an OptimStep or Save
        once everything before it is."""
        while self._operations:
            for op in list(self._operations):
                if not op.computes:
                    break
                if op.complete:
                    self._operations.remove(op)
                    op.future.set_result(ForwardResult(
                        op.logprobs, op.loss_sum if op.kind == "forward_backward" else None,
                        op.version))
            if not self._operations or self._operations[0].computes:
                return
            op = self._operations.popleft()
            try:
                result = self._optim_step(op.settings) if op.kind == "optim_step" \
                    else self._saved()
            except SessionFailed as error:
                op.future.set_exception(error)
            else:
                op.future.set_result(result)

    def _next_run(self) -> ExampleRun | None:
        """The next example to start: of the first operation with examples not started,
        unless an OptimStep or Save comes before it (which waits for everything before it)."""
        for op in self._operations:
            if not op.computes:
                return None
            if op.started < len(op.data):
                if op.started == 0:
                    op.version = self.weights_version
                    op.logprobs = [[0.0] * len(d.token_ids) for d in op.data]
                run = self._run(op, op.started)
                op.started += 1
                op.runs.append(run)
                return run
        return None

    def _run(self, op: Operation, index: int) -> ExampleRun:
        """Example `index` of `op`, with its loss over rows: row t predicts token t + 1, so
        each per-token array shifts by one, and the last row predicts nothing (weight 0)."""
        datum, device = op.data[index], self.model.device
        length = len(datum.token_ids)

        def rows(values) -> torch.Tensor:  # per token -> per row
            shifted = [*values[1:], 0.0] if values else [0.0] * length
            return torch.tensor(shifted, dtype=torch.float32, device=device)

        targets = torch.tensor([*datum.token_ids[1:], 0], dtype=torch.int64, device=device)
        trains = op.kind == "forward_backward"
        weights, sampled, advantages = rows(datum.weights), rows(datum.logprobs), \
            rows(datum.advantages)
        logprobs = op.logprobs[index]

        def loss(logits: torch.Tensor, start: int, n: int) -> torch.Tensor | None:
            end = start + n
            chosen = torch.log_softmax(logits.float(), dim=-1).gather(
                1, targets[start:end, None])[:, 0]  # (n,) logprob of each row's next token
            predicted = min(end, length - 1) - start  # rows with a next token
            logprobs[start + 1:start + 1 + predicted] = chosen[:predicted].tolist()
            if not trains:
                return None
            value = row_loss(op.loss, chosen, weights[start:end], sampled[start:end],
                             advantages[start:end])
            op.loss_sum += float(value.detach())
            return value

        return ExampleRun(list(datum.token_ids), loss, trains=trains)

    def _optim_step(self, settings: OptimizerSettings | None) -> OptimResult:
        settings = settings or self.spec.optimizer
        params = list(self.lora.parameters())
        max_norm = math.inf if settings.max_grad_norm is None else settings.max_grad_norm
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise SessionFailed(f"session {self.id}: the gradients' norm is {norm}; they "
                                "were discarded and the weights did not change")
        for group in self.optimizer.param_groups:
            group.update(lr=settings.lr, betas=settings.betas, eps=settings.eps,
                         weight_decay=settings.weight_decay)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.last_settings = settings
        previous, self.live = self.live.key, self._snapshot(self.live.version + 1)
        if self.on_weights is not None:
            self.on_weights(self, previous)
        return OptimResult(self.steps, self.weights_version, norm)

    def _saved(self) -> SavedWeights:
        """The live weights, with the provenance that a version saved from them records
        (the registry stores it as it is)."""
        spec = self.spec
        parent = f"{spec.name}@v{spec.parent_version}" if spec.parent_version else ""
        provenance = {"base_fingerprint": self.base_fingerprint, "session_id": self.id,
                      "parent_version": spec.parent_version, "steps": self.steps,
                      "weights_version": self.weights_version,
                      "hyperparameters": {"lora": asdict(spec.lora),
                                          "optimizer": asdict(self.last_settings),
                                          "seed": spec.seed, "parent": parent},
                      "source": "session"}
        return SavedWeights(self.live.adapter, self.steps, self.weights_version, provenance)

    def _snapshot(self, version: int) -> LiveWeights:
        return LiveWeights(f"session:{self.id}@w{version}", version,
                           lora_snapshot(self.lora, self.spec.lora))


def row_loss(loss: LossSpec, logprobs: torch.Tensor, weights: torch.Tensor,
             sampled: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The loss of rows, summed (session_spec's formulas): each row's logprob of its next
    token under the current weights, its weight, the sampler's logprob and the advantage."""
    if loss.name == "cross_entropy":
        return -(weights * logprobs).sum()
    ratio = torch.exp(logprobs - sampled)
    if loss.name == "importance_sampling":
        return -(weights * ratio * advantages).sum()
    clipped = ratio.clamp(1 - loss.clip_low, 1 + loss.clip_high)
    return -(weights * torch.minimum(ratio * advantages, clipped * advantages)).sum()
