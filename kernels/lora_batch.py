"""The rows of one batch on their adapters, as every segmented LoRA op reads them.

A flat batch of T rows is cut into S contiguous segments; segment i covers rows
`starts[i]:starts[i+1]` and uses the adapter in slot `slots[i]` of a pool, or none when the
slot is -1. A step's LoraBatch is made once (LoraRouting makes it for each set of slots its
projections serve) and passed explicitly to every op of the step. What an implementation
works out from the segments (batched torch: a layout of the rows; Triton: the segments and
their tables on the device) is worked out at its first op and kept in the batch, for the
batch's life: no cache outlives the step, and none is keyed by an object's identity.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")


class LoraBatch:
    def __init__(self, starts: torch.Tensor, slots: torch.Tensor):
        """starts (S+1,) and slots (S,), integer tensors on the host (copied there if not);
        ValueError unless starts rise from 0 and every slot is -1 or more."""
        starts, slots = starts.to("cpu", torch.int64), slots.to("cpu", torch.int64)
        if starts.dim() != 1 or slots.dim() != 1 or len(starts) != len(slots) + 1:
            raise ValueError(f"segments need starts (S+1,) and slots (S,); got starts "
                             f"{tuple(starts.shape)} and slots {tuple(slots.shape)}")
        if int(starts[0]) != 0 or bool((starts[1:] < starts[:-1]).any()):
            raise ValueError(f"segment starts must rise from 0 without going back; got "
                             f"{starts[:8].tolist()}...")
        if len(slots) and int(slots.min()) < -1:
            raise ValueError(f"segment slots must be -1 (no adapter) or a slot of the pool; "
                             f"got {int(slots.min())}")
        self.starts, self.slots = starts, slots
        self.rows = int(starts[-1])  # rows the segments cover
        self.top_slot = int(slots.max()) if len(slots) else -1
        self._derived: dict[Hashable, object] = {}

    @classmethod
    def of(cls, starts, slots) -> LoraBatch:
        """From lists or tensors."""
        return cls(torch.as_tensor(starts), torch.as_tensor(slots))

    def derived(self, key: Hashable, make: Callable[[], T]) -> T:
        """What an implementation works out from the segments, worked out once per batch."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def __repr__(self) -> str:
        return f"LoraBatch({len(self.slots)} segments over {self.rows} rows)"
