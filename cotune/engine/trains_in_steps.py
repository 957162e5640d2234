"""What the engine asks of anything it trains in its steps: a fine-tuning job (trainer.py) or
an RL session (session.py). The engine keeps both in one list, takes them in turn, and asks
each the same things; nothing in it asks which kind it has.

The engine reads and calls these on its thread (a job that a training lane trains is planned
and run on the lane's thread instead: training_lane.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from cotune.engine.example_pieces import Cost, TrainingWork
from cotune.engine.finetune_spec import FinetuneSpec
from cotune.engine.session_spec import SessionSpec
from cotune.engine.trainer import Published
from cotune.model.training_rows import TrainingRows


class TrainsInSteps(Protocol):
    spec: FinetuneSpec | SessionSpec  # its min_share: the floor of its share of step time
    # A job that spans ranks has done its share of an optimizer step and waits for the
    # other ranks' (trainer.py): nothing is planned for it meanwhile.
    awaiting_ranks: bool
    # A version is asked for at its next optimizer step (Runtime.checkpoint_jobs): its work
    # gets room however small the step's room is.
    checkpoint_requested: bool
    done: bool  # nothing more to train: the engine ends it (Engine.on_job_end)
    # Whether a training lane, where the engine has one, trains it beside the serving steps
    # rather than in them.
    may_train_on_lane: bool

    @property
    def has_work(self) -> bool:
        """Whether the steps to come have work to plan for it: read before each step, and by
        the engine's loop to tell whether to step at all."""

    def plan(self, seconds: float, cost: Cost, max_tokens: int, split: bool = True,
             at_least_one: bool = False) -> TrainingWork:
        """Its work that fits in `seconds` by `cost`, with at most `max_tokens` forward rows
        (ExamplePieces.plan): called before a step's forward pass, when its turn comes."""

    def run(self, work: TrainingWork, hidden: torch.Tensor | None,
            logits: Callable[[torch.Tensor], torch.Tensor], rows: TrainingRows | None,
            evaluate_at_once: bool = False) -> Published | None:
        """Called after the step's forward pass, once its served rows are sampled: the losses
        and backward of `work`'s rows (their hidden states, `hidden`). Returns a version it
        saved (a job's), which the engine announces (Engine.on_version)."""

    def work_failed(self, error: BaseException) -> bool:
        """Called when the work the engine planned for it failed (its pass, its backward, or
        the announcement of a version it saved). Returns whether it ends with `error`: the
        engine then removes it and reports it (Engine.on_job_end)."""
