"""What a step's forward pass gives back: a token for each served row that samples
(StepOutput), and what the training rows' backward needs (Forwarded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cotune.engine.sampling import TokenLogprob
from cotune.engine.sequence import Sequence
from cotune.model.llama import ForwardBatch


@dataclass
class StepOutput:
    seq: Sequence
    token_id: int
    text: str  # text that became final with this token
    logprob: TokenLogprob | None
    finished: bool


@dataclass(frozen=True)
class Forwarded:
    """A step's pass: the served rows' outputs, and what the training rows need for their
    backward (their hidden states and rows), and the seconds of the forward itself."""

    outputs: list[StepOutput]
    training_hidden: torch.Tensor | None
    batch: ForwardBatch | None
    seconds: float

    def training_seconds(self, inference_rows: int) -> float:
        """The seconds of this pass spent on its training rows: as timed, where the model
        runs them apart from the `inference_rows` served rows, else their share of the rows."""
        rows = None if self.batch is None else self.batch.training
        if rows is None:
            return 0.0
        if rows.forward_seconds is not None:
            return rows.forward_seconds
        return self.seconds * sum(rows.lengths) / (inference_rows + sum(rows.lengths))
