"""What trains in a step, and how much: the engine asks once per step, after the scheduler
has picked the step's inference tokens, and tells it afterwards what the step took. Each job's
share of step time is measured over the last share_window_s against its floor
(FinetuneSpec.min_share). With time slicing (EngineConfig.time_slice_s), the baseline that
co-serving is measured against, steps serve only or train only, in turn.
"""

from __future__ import annotations

import time
from collections import deque

from cotune.engine.example_pieces import TrainingWork
from cotune.engine.scheduler import Scheduler
from cotune.engine.step_time import StepTimeModel
from cotune.engine.trains_in_steps import TrainsInSteps


class TrainingPlan:
    def __init__(self, scheduler: Scheduler, max_batched_tokens: int, share_window_s: float,
                 time_slice_s: float | None, lane: bool, split_examples: bool):
        """`lane`: whether a training lane trains the jobs that may train on it (those leave
        the steps); `split_examples`: whether an example may run as pieces over several
        steps (False: each runs whole, as ranks in lockstep need)."""
        self.scheduler = scheduler
        self.max_batched_tokens, self.share_window_s = max_batched_tokens, share_window_s
        self.time_slice_s, self.lane, self.split_examples = time_slice_s, lane, split_examples
        # (when, step seconds, trainer or None, its training seconds) over share_window_s
        self._recent_steps: deque[tuple[float, float, TrainsInSteps | None, float]] = deque()

    def lane_trains(self, trainer: TrainsInSteps) -> bool:
        """Whether the training lane trains `trainer`, rather than the serving steps."""
        return self.lane and trainer.may_train_on_lane

    def phase(self, trainers: list[TrainsInSteps]) -> tuple[bool, bool]:
        """(whether this step serves, whether it trains): both, unless time slicing."""
        slice_s = self.time_slice_s
        training = any(t.has_work for t in trainers)
        if slice_s is None or not (training and self.scheduler.has_work):
            return True, True
        serving_phase = int(time.monotonic() / slice_s) % 2 == 0
        return serving_phase, not serving_phase

    def next_work(self, trainers: list[TrainsInSteps], inference_tokens: int,
                  step_time: StepTimeModel) -> tuple[TrainsInSteps | None, TrainingWork | None]:
        """(trainer, its work in this step) for the first in turn of `trainers` (jobs and RL
        sessions) that has work that fits, those below their floor (or asked for a version)
        first; (None, None) when none has. The one that gets work goes to the end of
        `trainers` (round robin).
        `step_time`: the engine's model of what a step's tokens cost.

        Serving comes first: a job gets the room the requests' SLOs leave beside the step's
        inference tokens (Scheduler.step_seconds); with nothing served, a step of the longest
        any step may take (a request that arrives meanwhile waits it out), and at least one
        unit of work.
        A room too small for training to spend at least half of it on tokens rather than on
        a pass's fixed cost is left unused while the requests' TPOT slack can still grow it:
        a later step gets a room worth training in. A job whose share of step time over the
        last share_window_s fell below its floor (spec.min_share) gets room for that share
        of this step, and at least the smallest unit of work; so does a job asked for a
        version before a stop (Runtime.checkpoint_jobs), whose work would otherwise be lost
        if the rooms of the grace period were too small for it."""
        ready = [t for t in trainers if not (t.awaiting_ranks or self.lane_trains(t))]
        if not ready:
            return None, None
        cap = self.max_batched_tokens
        model, serving = step_time, self.scheduler.has_work
        serve_seconds = model.predict(inference_tokens)
        # with nothing served too: a request arriving meanwhile waits out this step
        step = self.scheduler.step_seconds(time.monotonic())
        room = step - serve_seconds
        # a small room waits to grow, unless no step may be longer anyway
        worth_training = (room >= 2 * model.training_overhead
                          or step >= self.scheduler.max_step_seconds)
        pressed = {t for t in ready if t.checkpoint_requested or (
            t.spec.min_share > 0 and self._training_share(t) < t.spec.min_share)}
        for trainer in sorted(ready, key=lambda t: t not in pressed):  # stable: round robin
            if trainer not in pressed and not worth_training:
                continue
            share = trainer.spec.min_share
            seconds = max(room, serve_seconds * share / (1 - share)) if trainer in pressed \
                else room
            work = trainer.plan(seconds, model.training_cost, cap - inference_tokens,
                                split=self.split_examples,
                                at_least_one=trainer in pressed or not serving)
            if work:
                trainers.remove(trainer)
                trainers.append(trainer)  # round robin over jobs
                self.scheduler.counters["training_tokens"] += work.forward_tokens
                return trainer, work
        return None, None

    def remember_step(self, seconds: float, trainer: TrainsInSteps | None,
                      training_seconds: float) -> None:
        """A step took `seconds`, `training_seconds` of them training `trainer` (None: no
        training)."""
        now = time.monotonic()
        self._recent_steps.append((now, seconds, trainer, training_seconds))
        while self._recent_steps and self._recent_steps[0][0] < now - self.share_window_s:
            self._recent_steps.popleft()

    def _training_share(self, trainer: TrainsInSteps) -> float:
        """The share of step time spent training `trainer` over the recent window."""
        total = sum(seconds for _, seconds, _, _ in self._recent_steps)
        trained = sum(spent for _, _, t, spent in self._recent_steps if t is trainer)
        return trained / total if total else 0.0
