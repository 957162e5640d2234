"""What an RL session is asked to do: its adapter and settings, the examples of a
ForwardBackward or Forward, the loss, and what each operation returns.

Per-token arrays have one entry per token of `token_ids`. Entry t concerns token t, which the
model predicts from the tokens before it; token 0 has no prediction, so its weight is 0 and
the logprob returned for it is 0.0.

The losses, each a sum over the weighted tokens (normalise through the weights), with lp the
current logprob of a token, lp_s the sampler's, A its advantage and w its weight:
    cross_entropy:        -sum w * lp
    importance_sampling:  -sum w * exp(lp - lp_s) * A
    ppo:                  -sum w * min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A),
                          r = exp(lp - lp_s)
The sampler's logprobs are those of the model's raw distribution (what Generate reports):
sample at temperature 1 for them to be the sampling distribution's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from cotune.adapters.peft_format import LoraAdapter
from cotune.engine.finetune_spec import (
    MAX_LENGTH,
    LoraSettings,
    OptimizerSettings,
    SpecError,
    check_number,
)

LOSSES = ("cross_entropy", "importance_sampling", "ppo")
MAX_EXAMPLES = 4096  # examples in one ForwardBackward or Forward
MAX_BATCH_TOKENS = 1 << 20  # tokens over all examples of one call
MAX_ADVANTAGE = 1e6  # in magnitude: a loss of many such tokens stays a float32 number
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class SessionSpec:
    """A session on adapter `name`: new weights drawn from `seed`, or those of the PEFT
    directory `init_adapter` (version `parent_version` of `name`, which it continues)."""

    name: str
    lora: LoraSettings = field(default_factory=LoraSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)  # OptimStep's defaults
    seed: int = 0
    tenant: str = "default"
    init_adapter: str | Path | None = None
    parent_version: int = 0  # 0: new weights; recorded in the provenance of saved versions
    # the share of step time its work keeps however busy serving is (as FinetuneSpec's)
    min_share: float = 0.0

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise SpecError(f"adapter name {self.name!r} not accepted; use 1-128 letters, "
                            "digits, '.', '_' or '-', starting with a letter or digit")
        check_number("min_share", self.min_share, 0, 1, below_high=True)


@dataclass(frozen=True)
class LossSpec:
    """The loss of a ForwardBackward; ppo clips the ratio to [1 - clip_low, 1 + clip_high]."""

    name: str = "cross_entropy"
    clip_low: float = 0.2
    clip_high: float = 0.2

    def __post_init__(self):
        if self.name not in LOSSES:
            raise SpecError(f"loss {self.name!r} not accepted; choose from {', '.join(LOSSES)}")
        check_number("clip_low", self.clip_low, 0, 1, below_high=True)
        check_number("clip_high", self.clip_high, 0, 100)

    @property
    def needs_sampler(self) -> bool:
        """Whether examples must carry the sampler's logprobs and advantages."""
        return self.name != "cross_entropy"


@dataclass(frozen=True)
class Datum:
    """One example: its tokens, and per token (see the module's doc) the loss weight, and for
    importance_sampling and ppo the sampler's logprob and the advantage. A Forward needs
    only the tokens."""

    token_ids: tuple[int, ...]
    weights: tuple[float, ...] = ()
    logprobs: tuple[float, ...] | None = None
    advantages: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("token_ids", "weights", "logprobs", "advantages"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True)
class ForwardResult:
    """What a ForwardBackward or Forward returns: per example, per token the logprob under
    the weights it ran with (0.0 for token 0); the loss summed over the examples (None for
    a Forward); the weights version it ran with."""

    logprobs: list[list[float]]
    loss: float | None
    weights_version: int


@dataclass(frozen=True)
class OptimResult:
    """What an OptimStep returns: the optimizer steps taken so far, the weights version
    that sampling now uses, and the gradients' norm before clipping."""

    steps: int
    weights_version: int
    grad_norm: float


@dataclass(frozen=True)
class SavedWeights:
    """The live weights as a PEFT adapter (a copy), and their provenance."""

    adapter: LoraAdapter
    steps: int
    weights_version: int
    provenance: dict


def check_examples(data: list[Datum], loss: LossSpec | None, vocab_size: int,
                   context: int) -> None:
    """SpecError naming the first bad example and what is accepted; `loss` None: a Forward,
    which needs only tokens."""
    if not data:
        raise SpecError("a batch needs at least one example")
    if len(data) > MAX_EXAMPLES:
        raise SpecError(f"a batch of {len(data)} examples not accepted; at most {MAX_EXAMPLES}")
    total = sum(len(d.token_ids) for d in data)
    if total > MAX_BATCH_TOKENS:
        raise SpecError(f"a batch of {total} tokens not accepted; at most {MAX_BATCH_TOKENS} "
                        "over all its examples: split it over several calls")
    for i, datum in enumerate(data):
        _check_example(f"example {i}", datum, loss, vocab_size, min(context, MAX_LENGTH))


def _check_example(where: str, datum: Datum, loss: LossSpec | None, vocab_size: int,
                   context: int) -> None:
    ids, n = datum.token_ids, len(datum.token_ids)
    if not 2 <= n <= context:
        raise SpecError(f"{where}: {n} tokens not accepted; accepted: 2 to {context} (the "
                        "model's context)")
    bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise SpecError(f"{where}: token ids {bad[:5]} are outside the vocabulary "
                        f"[0, {vocab_size})")
    if loss is None:
        return
    _check_per_token(where, "weights", datum.weights, n)
    if datum.weights[0] != 0:
        raise SpecError(f"{where}: weights[0] is {datum.weights[0]}; token 0 is predicted "
                        "by nothing, so its weight must be 0")
    if any(w < 0 for w in datum.weights):
        raise SpecError(f"{where}: weights must not be negative")
    if not any(datum.weights):
        raise SpecError(f"{where}: every weight is 0, so it trains nothing; give its "
                        "completion tokens weight 1")
    if not loss.needs_sampler:
        if datum.logprobs is not None or datum.advantages is not None:
            raise SpecError(f"{where}: cross_entropy takes no logprobs or advantages; they "
                            "are for importance_sampling and ppo")
        return
    if any(w not in (0, 1) for w in datum.weights):
        raise SpecError(f"{where}: {loss.name} takes weights of 0 or 1 only (a mask of the "
                        "sampled tokens)")
    for name in ("logprobs", "advantages"):
        if getattr(datum, name) is None:
            raise SpecError(f"{where}: {loss.name} needs per-token {name}")
        _check_per_token(where, name, getattr(datum, name), n)
    if any(lp > 0 for lp in datum.logprobs):
        raise SpecError(f"{where}: logprobs must be <= 0 (log-probabilities)")
    if any(abs(a) > MAX_ADVANTAGE for a in datum.advantages):
        raise SpecError(f"{where}: advantages must be at most {MAX_ADVANTAGE:g} in magnitude")


def _check_per_token(where: str, name: str, values, n: int) -> None:
    if values is None or len(values) != n:
        count = 0 if values is None else len(values)
        raise SpecError(f"{where}: {count} {name} for {n} tokens; accepted: one per token")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in values):
        raise SpecError(f"{where}: {name} must be finite numbers (no NaN or Inf)")
