"""Which LoRA adapter each row of a flat token batch uses: built once per step, read by
every VirtualizedLinear of the model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn
from torch.nn import functional as F

from cotune.kernels.lora_batch import LoraBatch


class TrainableLora(nn.Module):
    """A LoRA adapter being trained: float32 A (r, d_in) and B (d_out, r) per target module,
    and LoRA dropout on its rows' inputs, drawn from its own generator (so that what else
    shares the batch never changes its masks). A DoRA adapter has a float32 magnitude
    (d_out,) per module too (`magnitudes`)."""

    def __init__(self, modules: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                 dropout: float = 0.0, generator: torch.Generator | None = None,
                 magnitudes: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.dropout, self.generator = dropout, generator
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        self.m = nn.ParameterDict()
        self.scales: dict[str, float] = {}
        for name, (a, b, scale) in modules.items():
            key = _param_key(name)
            self.a[key] = nn.Parameter(a.detach().clone().float())
            self.b[key] = nn.Parameter(b.detach().clone().float())
            self.scales[name] = float(scale)
        for name, magnitude in (magnitudes or {}).items():
            self.m[_param_key(name)] = nn.Parameter(magnitude.detach().clone().float())
        # DoRA's norms by module, with the versions of A and B they were taken at (dora_norm)
        self._norms: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}

    @property
    def dora(self) -> bool:
        return len(self.m) > 0

    def magnitude(self, name: str) -> torch.Tensor | None:
        """DoRA's magnitude of module `name`, or None (plain LoRA, or not targeted)."""
        return self.m[_param_key(name)] if _param_key(name) in self.m else None

    def dora_norm(self, name: str, base_weight: Callable[[], torch.Tensor]) -> torch.Tensor:
        """||W + scale B A|| per output row of module `name`, float32 without autograd (DoRA
        takes it as a constant), W = base_weight(). A and B change only at an optimizer step
        (or a load), and every pass until then reads the same norm: it is worked out again
        only when their version counters moved (torch counts every in-place update of a
        tensor, an optimizer step's and copy_ included)."""
        a, b, scale = self.weights(name)
        versions = (a._version, b._version)
        if name not in self._norms or self._norms[name][0] != versions:
            with torch.no_grad():
                weight = base_weight().float() + scale * (b.float() @ a.float())
                self._norms[name] = versions, torch.linalg.norm(weight, dim=1)
        return self._norms[name][1]

    def module_names(self) -> list[str]:
        return list(self.scales)

    def weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, scale) of module `name`, or None when this adapter does not target it."""
        if name not in self.scales:
            return None
        key = _param_key(name)
        return self.a[key], self.b[key], self.scales[name]


def _param_key(module_name: str) -> str:
    # ParameterDict keys cannot hold dots.
    return module_name.replace(".", "/")


@dataclass
class LoraRouting:
    """Contiguous segments of rows, each on one adapter.

    seg_starts:     (S+1,) row offsets
    seg_slots:      (S,) resident slot of each segment, -1 for none (served rows)
    seg_trainables: (S,) index into `trainables`, -1 for none (trained rows)
    A segment has at most one of the two; rows with neither get exactly the base output.
    """

    seg_starts: list[int]
    seg_slots: list[int]
    seg_trainables: list[int]
    trainables: list[TrainableLora] = field(default_factory=list)
    # what the layers serve in this step, by what they hold (virtualized_linear.served_slots)
    served: dict = field(default_factory=dict, repr=False)
    # the step's LoraBatch of each set of segment slots (`batch`)
    batches: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_sequences(cls, seq_lens: Sequence[int], adapters: Sequence) -> LoraRouting:
        """One entry of `adapters` per sequence: a slot, a TrainableLora, or None.
        Neighbouring sequences on the same adapter share a segment."""
        if len(seq_lens) != len(adapters):
            raise ValueError(f"{len(seq_lens)} sequences but {len(adapters)} adapters")
        starts, slots, trains, trainables = [0], [], [], []
        for n, adapter in zip(seq_lens, adapters):
            slot, train = -1, -1
            if isinstance(adapter, TrainableLora):
                if not any(t is adapter for t in trainables):
                    trainables.append(adapter)
                train = next(i for i, t in enumerate(trainables) if t is adapter)
            elif adapter is not None:
                slot = int(adapter)
            if slots and slots[-1] == slot and trains[-1] == train:
                starts[-1] += n
            else:
                slots.append(slot)
                trains.append(train)
                starts.append(starts[-1] + n)
        return cls(starts, slots, trains, trainables)

    def first_rows(self, rows: int) -> LoraRouting:
        """The routing of rows 0..rows-1 alone; `rows` must end a segment."""
        if rows not in self.seg_starts:
            raise ValueError(f"row {rows} splits a segment of {self.seg_starts}")
        end = self.seg_starts.index(rows)
        return LoraRouting(self.seg_starts[:end + 1], self.seg_slots[:end],
                           self.seg_trainables[:end], self.trainables)

    @property
    def has_training(self) -> bool:
        return any(t >= 0 for t in self.seg_trainables)

    @property
    def only_trainable(self) -> TrainableLora | None:
        """The adapter being trained when every row trains it (a training pass of one job,
        the engine's case), else None."""
        if self.seg_trainables == [0] and len(self.trainables) == 1:
            return self.trainables[0]
        return None

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, d) with each trained segment's LoRA dropout applied to its rows (a fresh mask
        per call, as PEFT draws one per module)."""
        if not any(t.dropout > 0 for t in self.trainables):
            return x
        pieces, starts = [], self.seg_starts
        for i, index in enumerate(self.seg_trainables):
            rows = x[starts[i]:starts[i + 1]]
            if index >= 0 and self.trainables[index].dropout > 0:
                trainable = self.trainables[index]
                keep = 1.0 - trainable.dropout
                mask = torch.empty(rows.shape).bernoulli_(keep, generator=trainable.generator)
                rows = rows * (mask.to(rows) / keep)
            pieces.append(rows)
        pieces.append(x[starts[-1]:])
        return torch.cat(pieces)

    @cached_property
    def starts(self) -> torch.Tensor:
        """seg_starts as a tensor, made once per step for every layer."""
        return torch.tensor(self.seg_starts, dtype=torch.int64)

    @cached_property
    def slots(self) -> torch.Tensor:
        """seg_slots as a tensor, shared by every projection that holds all of them."""
        return torch.tensor(self.seg_slots, dtype=torch.int64)

    def batch(self, seg_slots: torch.Tensor) -> LoraBatch:
        """The segments of this routing on `seg_slots` (its own slots, or some of them, or
        trained adapters' indices) as the LoRA ops take them: made once per step for each set
        of slots, and shared by every projection that routes its rows so."""
        key = tuple(seg_slots.tolist())
        if key not in self.batches:
            self.batches[key] = LoraBatch(self.starts, seg_slots)
        return self.batches[key]

    def training_pool(self, name: str, device, dtype):
        """The trained adapters' weights of module `name`, stacked and padded to one rank:
        (a_pool (N, R, d_in), b_pool (N, d_out, R), scales (N,), batch: each segment on its
        adapter's index); differentiable with respect to each adapter's A and B. None when
        no trained segment targets `name`."""
        if any(t.dora for t in self.trainables):
            raise ValueError("a DoRA adapter trains alone in its pass (its rows' output is "
                             "rescaled by its own magnitude); the engine never mixes them")
        weights = [t.weights(name) for t in self.trainables]
        seg_slots = [i if i >= 0 and weights[i] is not None else -1 for i in self.seg_trainables]
        if all(s < 0 for s in seg_slots):
            return None
        present = [w for w in weights if w is not None]
        rank = max(a.shape[0] for a, _, _ in present)
        d_in, d_out = present[0][0].shape[1], present[0][1].shape[0]
        # An adapter that does not target this module gets zeros and scale 0; no segment of
        # this module points at it anyway.
        a_pool = torch.stack([torch.zeros(rank, d_in) if w is None
                              else F.pad(w[0], (0, 0, 0, rank - w[0].shape[0])) for w in weights])
        b_pool = torch.stack([torch.zeros(d_out, rank) if w is None
                              else F.pad(w[1], (0, rank - w[1].shape[1])) for w in weights])
        scales = [0.0 if w is None else w[2] for w in weights]
        return (
            a_pool.to(device=device, dtype=dtype),  # (N, R, d_in)
            b_pool.to(device=device, dtype=dtype),  # (N, d_out, R)
            torch.tensor(scales, dtype=torch.float32, device=device),
            self.batch(torch.tensor(seg_slots, dtype=torch.int64)),
        )
