"""What a fine-tuning job is asked to do: the new adapter, its data and every setting."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cotune.model.targets import ATTENTION_TARGETS, LORA_TARGETS

SCHEDULES = ("constant", "linear", "cosine")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SpecError(ValueError):
    """A fine-tuning spec cotune refuses; the message says what is accepted."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False
    targets: tuple[str, ...] = ATTENTION_TARGETS
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        _require(isinstance(self.rank, int) and self.rank >= 1,
                 f"rank must be >= 1, got {self.rank}")
        _require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        _require(self.targets and not unknown,
                 f"targets {unknown or '[]'} not accepted; choose from {', '.join(LORA_TARGETS)}")
        _require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")

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
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"betas must be two numbers in [0, 1), got {self.betas}")
        _require(self.eps > 0 and self.weight_decay >= 0, "eps must be > 0, weight_decay >= 0")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0,
                 f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


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

    def __post_init__(self):
        _require(bool(_NAME.match(self.name)),
                 f"adapter name {self.name!r} not accepted; use 1-128 letters, digits, '.', "
                 "'_' or '-', starting with a letter or digit")
        _require(self.schedule in SCHEDULES,
                 f"schedule {self.schedule!r} not accepted; choose from {', '.join(SCHEDULES)}")
        for name in ("batch_size", "grad_accumulation", "epochs", "max_length"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"{name} must be >= 1, got {value}")
        _require(self.warmup_steps >= 0 and self.checkpoint_every >= 0,
                 "warmup_steps and checkpoint_every must be >= 0")
        _require(self.max_steps is None or self.max_steps >= 1,
                 f"max_steps must be >= 1 or None, got {self.max_steps}")
        _require(0 <= self.eval_fraction < 1,
                 f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _require(0 <= self.min_share < 1,
                 f"min_share must be in [0, 1) (a share of step time), got {self.min_share}")

    @property
    def adapter_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def hyperparameters(self) -> dict:
        """Everything that shapes the result, for provenance."""
        fields = asdict(self)
        fields["data"], fields["output_dir"] = str(self.data), str(self.output_dir)
        return fields


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)
