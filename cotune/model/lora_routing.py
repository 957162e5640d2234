"""Which LoRA adapter each row of a flat token batch uses: built once per step, read by
every VirtualizedLinear of the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


class TrainableLora(nn.Module):
    """A LoRA adapter being trained: float32 A (r, d_in) and B (d_out, r) per target module."""

    def __init__(self, modules: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]):
        super().__init__()
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        self.scales: dict[str, float] = {}
        for name, (a, b, scale) in modules.items():
            key = _param_key(name)
            self.a[key] = nn.Parameter(a.detach().clone().float())
            self.b[key] = nn.Parameter(b.detach().clone().float())
            self.scales[name] = float(scale)

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

    @property
    def has_training(self) -> bool:
        return any(t >= 0 for t in self.seg_trainables)

    def starts_tensor(self) -> torch.Tensor:
        return torch.tensor(self.seg_starts, dtype=torch.int64)

    def training_pool(self, name: str, device, dtype):
        """The trained adapters' weights of module `name`, stacked and padded to one rank:
        (a_pool (N, R, d_in), b_pool (N, d_out, R), scales (N,), seg_slots (S,)); differentiable
        with respect to each adapter's A and B. None when no trained segment targets `name`."""
        weights = [t.weights(name) for t in self.trainables]
        seg_slots = [i if i >= 0 and weights[i] is not None else -1 for i in self.seg_trainables]
        if all(s < 0 for s in seg_slots):
            return None
        rank = max(w[0].shape[0] for w in weights if w is not None)
        a_list, b_list, scales = [], [], []
        for w in weights:
            if w is None:  # a trained adapter that does not target this module
                a_list.append(None)
                b_list.append(None)
                scales.append(0.0)
                continue
            a, b, scale = w
            pad = rank - a.shape[0]
            a_list.append(nn.functional.pad(a, (0, 0, 0, pad)))  # (R, d_in)
            b_list.append(nn.functional.pad(b, (0, pad)))  # (d_out, R)
            scales.append(scale)
        a_ref = next(a for a in a_list if a is not None)
        b_ref = next(b for b in b_list if b is not None)
        a_pool = torch.stack([a if a is not None else torch.zeros_like(a_ref) for a in a_list])
        b_pool = torch.stack([b if b is not None else torch.zeros_like(b_ref) for b in b_list])
        return (
            a_pool.to(device=device, dtype=dtype),
            b_pool.to(device=device, dtype=dtype),
            torch.tensor(scales, dtype=torch.float32, device=device),
            torch.tensor(seg_slots, dtype=torch.int64),
        )
