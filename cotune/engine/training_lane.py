"""A training lane: a thread of its own that trains the engine's jobs beside its serving
steps, on cores the steps leave idle.

Co-serving in one pass is what a GPU wants: one device, whose every step should be full. On
a CPU whose cores outnumber the torch threads a serving step can use, the cores themselves
are the devices: a job's forward and backward passes on another core cost the requests
little (the GIL is released inside torch's ops; `cotune bench training_thread` measured 0.85x
of serving's solo speed and 0.91x of training's, both at once), where in the steps' passes a
job gets only the room the requests' time per output token leaves.

The lane owns its jobs' compute and files: it plans each pass with the jobs' `Trainer.plan`
(a room of PASS_SECONDS by its own step-time model, examples in pieces where they are longer),
runs the forward and `Trainer.run` (losses, backward, optimizer steps, a version's evaluation
and its files), one job after another. What concerns the rest of the engine, a version to
announce and serve, a job that ended, reaches the engine thread as a `LanePass` and takes
effect at its next step boundary (`Engine._take_lane_passes`). Jobs come and go through
`add` and `remove`, which take effect between two passes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cotune.engine.step_time import StepTimeModel
from cotune.engine.trainer import Published, Trainer
from cotune.model.llama import CausalLM, ForwardBatch
from cotune.model.training_rows import TrainingRows

# A pass's room: long enough that its fixed costs are small, short enough that a cancel, a
# checkpoint request or a stop waits little for the pass in progress.
PASS_SECONDS = 0.5


@dataclass(frozen=True)
class LanePass:
    """One pass of the lane: its job, what it computed and how long it took, and what came of
    it (a version saved; the job done, or failed with `error`). `ended` is the job's state
    as of this pass: by the time the engine takes it, the lane may have run the job's next
    passes."""

    trainer: Trainer
    forward_tokens: int
    backward_tokens: int
    seconds: float
    published: Published | None = None
    ended: bool = False
    error: BaseException | None = None


class TrainingLane:
    def __init__(self, model: CausalLM, num_threads: int, max_tokens: int,
                 on_pass: Callable[[], None]):
        """`on_pass` is called on the lane's thread after every pass (a pass is waiting in
        `take_passes`): it wakes an idle engine loop."""
        self.model, self.max_tokens, self._on_pass = model, max_tokens, on_pass
        self._num_threads = num_threads
        self.step_time = StepTimeModel()  # of the lane's passes, whose rooms it sizes
        self._commands: queue.SimpleQueue[tuple[bool, Trainer] | None] = queue.SimpleQueue()
        self._passes: queue.SimpleQueue[LanePass] = queue.SimpleQueue()
        self._trainers: list[Trainer] = []  # the lane thread's own
        self._thread = threading.Thread(target=self._loop, name="cotune-training", daemon=True)
        self._thread.start()

    def add(self, trainer: Trainer) -> None:
        """Starts training `trainer` from the next pass on (any thread)."""
        self._commands.put((True, trainer))

    def remove(self, trainer: Trainer) -> None:
        """Stops training `trainer` after the pass in progress (any thread)."""
        self._commands.put((False, trainer))

    def stop(self) -> None:
        """Ends the lane after the pass in progress, and waits for it."""
        self._commands.put(None)
        self._thread.join()

    @property
    def has_passes(self) -> bool:
        return not self._passes.empty()

    def take_passes(self) -> list[LanePass]:
        """The passes done since the last call, in order (the engine thread's)."""
        done = []
        while not self._passes.empty():
            done.append(self._passes.get())
        return done

    def _loop(self) -> None:
        torch.set_num_threads(self._num_threads)
        while self._apply_commands(wait=not self._trainers):
            if not self._trainers:
                continue
            trainer = self._trainers.pop(0)
            self._trainers.append(trainer)  # round robin over jobs
            done = self._pass(trainer)
            if done.ended:
                self._trainers.remove(trainer)
            self._passes.put(done)
            self._on_pass()

    def _apply_commands(self, wait: bool) -> bool:
        """Adds and removes jobs as asked (waiting for a command when `wait`); False once
        the lane is to stop."""
        while True:
            try:
                command = self._commands.get(block=wait)
            except queue.Empty:
                return True
            if command is None:
                return False
            adds, trainer = command
            if adds:
                self._trainers.append(trainer)
            elif trainer in self._trainers:
                self._trainers.remove(trainer)
            wait = wait and not self._trainers

    def _pass(self, trainer: Trainer) -> LanePass:
        """Plans, forwards and trains one pass of `trainer`'s work. A job that fails, in
        its own code or in the model's, ends alone."""
        started = time.perf_counter()
        forward_tokens = backward_tokens = 0
        try:
            work = trainer.plan(PASS_SECONDS, self.step_time.training_cost, self.max_tokens,
                                at_least_one=True)
            if not work:
                raise RuntimeError(f"job {trainer.job_id} has no work left and has not "
                                   "finished")
            forward_tokens, backward_tokens = work.forward_tokens, work.backward_tokens
            hidden = rows = None
            if work.pieces:
                rows = TrainingRows(work.pieces)
                batch = ForwardBatch(torch.tensor([t for ids in work.token_ids() for t in ids]),
                                     rows.lengths, lora=rows.routing(), training=rows)
                with torch.enable_grad():
                    hidden = self.model(batch)
            forwarded = time.perf_counter()
            published = trainer.run(work, hidden, self.model.logits, rows)
        except Exception as e:  # noqa: BLE001 - the job reports it; the lane goes on
            return LanePass(trainer, forward_tokens, backward_tokens,
                            time.perf_counter() - started, ended=True, error=e)
        ended = time.perf_counter()
        if work.backward_passes:  # the losses count with the backward, as in the engine's
            self.step_time.observe(0, ended - started, forward_tokens, forwarded - started,
                                   backward_tokens, work.backward_passes, ended - forwarded)
        elif forward_tokens:
            self.step_time.observe(0, ended - started, forward_tokens, ended - started)
        return LanePass(trainer, forward_tokens, backward_tokens, ended - started, published,
                        ended=trainer.done)
