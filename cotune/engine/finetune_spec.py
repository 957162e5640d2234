"""What a fine-tuning job is asked to do: the new adapter, its data and every setting."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cotune.adapters.validation import MAX_LORA_ALPHA
from cotune.model.targets import ATTENTION_TARGETS, LORA_TARGETS

SCHEDULES = ("constant", "linear", "cosine")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Bounds of every number of a spec. Steps travel as int32 on the wire (training.proto), so no
# count of steps (max_steps, warmup, checkpoint interval, nor a job's total) may pass MAX_STEPS;
# the others are far past any real run and stop a spec from making a job that never ends.
MAX_STEPS = 2**31 - 1
MAX_RANK = 1024
MAX_BATCH_SIZE = 4096
MAX_GRAD_ACCUMULATION = 4096
MAX_EPOCHS = 10_000
MAX_LENGTH = 1 << 20  # tokens per example


class SpecError(ValueError):
    """A fine-tuning spec cotune refuses; the message says what is accepted."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False
    targets: tuple[str, ...] = ATTENTION_TARGETS
    dropout: float = 0.0
    dora: bool = False  # DoRA: a learned magnitude per output rescales W + s B A

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        _require(isinstance(self.dora, bool), f"dora {self.dora!r} not accepted; accepted: "
                 "true or false")
        check_whole("rank", self.rank, 1, MAX_RANK)
        check_number("alpha", self.alpha, 0, MAX_LORA_ALPHA, above_low=True)
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        _require(self.targets and not unknown,
                 f"targets {unknown or '[]'} not accepted; choose from {', '.join(LORA_TARGETS)}")
        check_number("dropout", self.dropout, 0, 1, below_high=True)

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        check_number("lr", self.lr, 0, 1, above_low=True)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"betas must be two numbers in [0, 1), got {self.betas}")
        check_number("eps", self.eps, 0, 1, above_low=True)
        check_number("weight_decay", self.weight_decay, 0, 1)
        if self.max_grad_norm is not None:
            check_number("max_grad_norm", self.max_grad_norm, 0, math.inf, above_low=True,
                         below_high=True)


@dataclass(frozen=True)
class FinetuneSpec:
    """A job: train adapter `name` on the JSONL file `data`; versions go under
    `output_dir / name / v{k}` (PEFT files) with their training state beside them."""

    name: str
    data: str | Path
    output_dir: str | Path
    lora: LoraSettings = field(default_factory=LoraSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 4  # examples per micro-batch
    grad_accumulation: int = 1  # micro-batches per optimizer step
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    max_length: int = 1024  # tokens per example; longer ones are cut
    eval_fraction: float = 0.0
    checkpoint_every: int = 0  # optimizer steps between versions; 0: only the final one
    seed: int = 0
    tenant: str = "default"
    # The share of the engine's step time this job keeps however busy serving is, measured
    # over a window of seconds; 0: it trains only in the room the serving SLOs leave. (On a
    # training lane, beside the steps, a job trains all the time: the floor has no use there.)
    min_share: float = 0.0
    # A PEFT directory of this adapter's weights to start from (those of the version a job
    # continues); None: new weights drawn from the seed. The job's own checkpoints come first.
    init_adapter: str | Path | None = None

    def __post_init__(self):
        _require(bool(_NAME.match(self.name)),
                 f"adapter name {self.name!r} not accepted; use 1-128 letters, digits, '.', "
                 "'_' or '-', starting with a letter or digit")
        _require(self.schedule in SCHEDULES,
                 f"schedule {self.schedule!r} not accepted; choose from {', '.join(SCHEDULES)}")
        check_whole("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_whole("grad_accumulation", self.grad_accumulation, 1, MAX_GRAD_ACCUMULATION)
        check_whole("epochs", self.epochs, 1, MAX_EPOCHS)
        check_whole("max_length", self.max_length, 1, MAX_LENGTH)
        check_whole("warmup_steps", self.warmup_steps, 0, MAX_STEPS)
        check_whole("checkpoint_every", self.checkpoint_every, 0, MAX_STEPS)
        if self.max_steps is not None:
            check_whole("max_steps", self.max_steps, 1, MAX_STEPS)
        check_number("eval_fraction", self.eval_fraction, 0, 1, below_high=True)
        check_number("min_share", self.min_share, 0, 1, below_high=True)

    @property
    def adapter_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def hyperparameters(self) -> dict:
        """Everything that shapes the result, for provenance."""
        fields = asdict(self)
        fields["data"], fields["output_dir"] = str(self.data), str(self.output_dir)
        if self.init_adapter is not None:
            fields["init_adapter"] = str(self.init_adapter)
        return fields


def check_whole(name: str, value, low: int, high: int) -> None:
    """SpecError unless `value` is a whole number in [low, high]."""
    _require(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
             f"{name} {value!r} not accepted; accepted: a whole number from {low} to {high}")


def check_number(name: str, value, low: float, high: float, *, above_low: bool = False,
                 below_high: bool = False) -> None:
    """SpecError unless `value` is a number between low and high, each end included unless
    `above_low` / `below_high` (NaN is never accepted)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    inside = number and (low < value if above_low else low <= value) and \
        (value < high if below_high else value <= high)
    interval = f"{'(' if above_low else '['}{low:g}, {high:g}{')' if below_high else ']'}"
    _require(inside, f"{name} {value!r} not accepted; accepted: a number in {interval}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)
