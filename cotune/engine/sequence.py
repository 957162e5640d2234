"""One generation request as the engine tracks it from arrival to its last token."""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from cotune.engine.detokenizer import IncrementalDetokenizer
from cotune.engine.sampling import SamplingParams, TokenLogprob


class SeqState(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"  # its keys and values are (partly) in the cache
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    slot: int | None = None  # its adapter's device slot while it runs; None for the base model
    adapter: str | None = None  # the adapter's key, for accounting and residency pins
    adapter_load: Future | None = None  # the adapter's disk->host load, begun when queued
    tenant: str = "default"
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    computed: int = 0  # leading tokens whose keys and values are cached
    state: SeqState = SeqState.WAITING
    # "stop", "length", "abort", or "error" (its adapter failed to load: adapter_load says why)
    finish_reason: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    preemptions: int = 0
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    weights_version: int | None = None  # of the RL session whose live weights it samples

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def pending(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return len(self.prompt_ids) + len(self.output_ids) - self.computed

    @property
    def is_finished(self) -> bool:
        return self.state is SeqState.FINISHED
