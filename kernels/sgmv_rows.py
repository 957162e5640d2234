"""Segmented LoRA products one row at a time, reading the pool in place: for batches whose
rows mostly have an adapter of their own (decode steps over many distinct adapters), where
the batched matmuls of `sgmv_torch` would first gather every segment's weights and pad the
segments to one length.

Each row's product is an embedding bag over the stored rows of its slot:
  shrink  h[t] = sum_i x[t, i] * A[slot]ᵀ[i]   (the pool's row i of the slot: A[slot, :, i])
  expand  y[t] += sum_r h[t, r] * scale * Bᵀ[slot][r]
which is exactly x[t] @ A[slot].T and h[t] @ B[slot].T, computed by one op over all rows.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class RowBags:
    """The rows of a batch that have an adapter, and each one's slot.

    rows:  (K,) those rows, or None when they are all the batch's rows, in order
    slots: (K,) the slot of each
    """

    def __init__(self, rows: torch.Tensor | None, slots: torch.Tensor):
        self.rows, self.slots = rows, slots
        self._bags: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def bags(self, rows_per_slot: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, offsets) of bags of `size` consecutive table rows, starting at row
        slot * rows_per_slot; made once per shape for all the step's layers."""
        key = (rows_per_slot, size)
        if key not in self._bags:
            indices = self.slots[:, None] * rows_per_slot + torch.arange(
                size, device=self.slots.device)
            offsets = torch.arange(0, len(self.slots) * size, size, device=self.slots.device)
            self._bags[key] = (indices.reshape(-1), offsets)
        return self._bags[key]

    def pick(self, src: torch.Tensor) -> torch.Tensor:
        """src's rows that have an adapter: (K, ...)."""
        return src if self.rows is None else src.index_select(0, self.rows)

    def scales(self, scales: torch.Tensor, dtype) -> torch.Tensor:
        """(K, 1): the scale of each row's slot."""
        return scales.index_select(0, self.slots).to(dtype)[:, None]


def stored_rows(weights: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """The pool `weights` (N, C, K) read as a table of stored rows: (table, rows per slot),
    where table row slot * rows_per_slot + k holds weights[slot, :, k] in its first C
    columns. None when the storage does not allow it (then the caller gathers instead): the
    C values of one k must be adjacent, and slots evenly spaced by whole rows.

    VirtualizedLinear's pools are stored with their last two dimensions swapped, so a rank
    slice of A (N, R, d_in) is read through rows of the padded max rank, and B (N, d_out, R)
    through rows of d_out."""
    num, columns, per_slot = weights.shape
    slot_stride, column_stride, width = weights.stride()  # width: a stored row's stride
    if column_stride != 1 or num == 0 or width < columns or slot_stride % width \
            or slot_stride // width < per_slot:
        return None
    end = weights.storage_offset() + num * slot_stride
    if end > weights.untyped_storage().nbytes() // weights.element_size():
        return None
    rows_per_slot = slot_stride // width
    table = weights.as_strided((num * rows_per_slot, width), (width, 1),
                               weights.storage_offset())
    return table, rows_per_slot


def shrink_rows(x: torch.Tensor, table: torch.Tensor, rows_per_slot: int, rank: int,
                bags: RowBags, scales: torch.Tensor | None) -> torch.Tensor:
    """h (T, rank): scale * x[t] @ A[slot].T on the rows that have an adapter, 0 elsewhere."""
    indices, offsets = bags.bags(rows_per_slot, x.shape[1])
    out = F.embedding_bag(indices, table, offsets, mode="sum",
                          per_sample_weights=bags.pick(x).reshape(-1))[:, :rank]
    if scales is not None:
        out = out * bags.scales(scales, out.dtype)
    if bags.rows is None:
        return out.contiguous()
    h = torch.zeros(x.shape[0], rank, dtype=x.dtype, device=x.device)
    h[bags.rows] = out
    return h


def expand_rows(y: torch.Tensor, h: torch.Tensor, table: torch.Tensor, rows_per_slot: int,
                bags: RowBags, scales: torch.Tensor | None) -> torch.Tensor:
    """y[t] += scale * h[t] @ B[slot].T on the rows that have an adapter (in place)."""
    inputs = bags.pick(h).to(y.dtype)
    if scales is not None:
        inputs = inputs * bags.scales(scales, y.dtype)
    indices, offsets = bags.bags(rows_per_slot, h.shape[1])
    out = F.embedding_bag(indices, table, offsets, mode="sum",
                          per_sample_weights=inputs.reshape(-1))[:, :y.shape[1]]
    if bags.rows is None:
        return y.add_(out)
    return y.index_add_(0, bags.rows, out)
