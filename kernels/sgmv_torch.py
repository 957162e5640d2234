"""Segmented LoRA ops in batched torch: the fast implementation where Triton is not used
(the CPU). Same signatures and semantics as `sgmv_reference`.

The segments that have an adapter are laid out as S segments of L rows (padded to the
longest), so that each op is one batched matmul whatever the number of adapters. Two cases
cost no copies at all, and they are the common ones in serving:
  - a block: the segments are back to back and of one length (decode rows sorted by adapter),
    so the rows are a view of the input, and the expand adds in place;
  - a window: the segments use consecutive slots in order, so the adapters' weights are a
    view of the pool (no gather). Residency fills the lowest free slots first to make this
    likely.
Pools whose logical (N, R, d) is stored as (N, d, R) (see VirtualizedLinear) multiply without
transposition. Where segments are one or two rows long on scattered slots (decode over many
distinct adapters), gathering each segment's weights would cost more than the products: such
batches run row by row on the pool in place (`sgmv_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cotune.kernels.lora_batch import LoraBatch
from cotune.kernels.sgmv_rows import RowBags, expand_rows, shrink_rows, stored_rows
from cotune.kernels.slices import expand_each, shrink_each

# The slices of a layer run one op at a time; on the CPU one GEMM over gate and up side by side
# is also slower than two (SmolLM2 at 32 rows: 1.75 ms against 1.45 ms).
FUSED_SLICES = False


@dataclass(frozen=True)
class _Layout:
    """How the adapter segments of a batch map onto an (S, L) grid.

    block:   first row of a gap-free run of S * L rows (all segments length L), else None
    rows:    (S * L,) row of each grid cell, padding cells on row 0 (when block is None)
    picked:  (K,) grid cells that are real rows (when block is None)
    targets: (K,) their rows in the batch (when block is None)
    slots:   (S,) each segment's slot
    window:  first slot when slots are consecutive and increasing, else None
    bags:    the rows with an adapter, for the products row by row (see _plan), else None
    """

    num: int
    length: int
    block: int | None
    rows: torch.Tensor | None
    picked: torch.Tensor | None
    targets: torch.Tensor | None
    slots: torch.Tensor
    window: int | None
    bags: RowBags | None

    def gather_rows(self, src: torch.Tensor) -> torch.Tensor:
        """src's adapter rows on the grid: (S, L, d)."""
        if self.block is not None:
            return src[self.block:self.block + self.num * self.length].view(
                self.num, self.length, src.shape[1])
        return src.index_select(0, self.rows).view(self.num, self.length, src.shape[1])

    def weights(self, pool: torch.Tensor) -> torch.Tensor:
        """Each segment's matrix, (S, ...): a view of the pool for a window, else a gather
        that keeps the pool's layout (a pool stored with its last two dimensions swapped is
        gathered as stored: whole rows copied, 4-5x faster on the CPU than a gather into
        the logical order, and the matmuls read it without transposition)."""
        if self.window is not None:
            return pool[self.window:self.window + self.num]
        slots = self.slots.to(pool.device)
        if pool.dim() == 3 and pool.stride(1) == 1 and pool.stride(2) != 1:
            return pool.transpose(1, 2).index_select(0, slots).transpose(1, 2)
        return pool.index_select(0, slots)


def _layout(batch: LoraBatch, device) -> _Layout | None:
    """The layout of the segments that have an adapter, None when there are none: worked
    out at the batch's first op on `device`, for every projection of the step."""
    return batch.derived(("torch layout", device),
                         lambda: _plan(batch.starts, batch.slots, device))


def _plan(seg_starts: torch.Tensor, seg_slots: torch.Tensor, device) -> _Layout | None:
    starts, lengths = seg_starts[:-1], seg_starts[1:] - seg_starts[:-1]
    keep = (seg_slots >= 0) & (lengths > 0)
    starts, lengths, slots = starts[keep], lengths[keep], seg_slots[keep]
    num = len(slots)
    if not num:
        return None
    length = int(lengths.max())
    first_slot = int(slots[0])
    window = first_slot if bool((slots == torch.arange(first_slot, first_slot + num)).all()) \
        else None
    # Row by row where the weights would be gathered for segments of one or two rows.
    bags = _row_bags(starts, lengths, slots, int(seg_starts[-1]), device) \
        if window is None and int(lengths.sum()) <= 2 * num else None
    first_row = int(starts[0])
    if bool((lengths == length).all()) and bool(
            (starts == first_row + length * torch.arange(num)).all()):
        return _Layout(num, length, first_row, None, None, None, slots.to(device), window, bags)
    offsets = torch.arange(length)
    valid = (offsets[None, :] < lengths[:, None]).reshape(-1)  # (S * L,)
    rows = (starts[:, None] + offsets[None, :]).reshape(-1)  # (S * L,)
    return _Layout(num, length, None, torch.where(valid, rows, 0).to(device),
                   valid.nonzero()[:, 0].to(device), rows[valid].to(device), slots.to(device),
                   window, bags)


def _row_bags(starts, lengths, slots, num_rows: int, device) -> RowBags:
    """Each row that has an adapter, with its slot; rows None when that is every row."""
    row_slots = slots.repeat_interleave(lengths)
    before = torch.cumsum(lengths, 0) - lengths  # rows with an adapter before each segment
    rows = (starts - before).repeat_interleave(lengths) + torch.arange(len(row_slots))
    return RowBags(None if len(rows) == num_rows else rows.to(device), row_slots.to(device))


def _stored_rows(layout: _Layout, weights: torch.Tensor, dtype):
    """The pool as a table of stored rows when this batch runs row by row, else None."""
    if layout.bags is None or weights.dtype != dtype:
        return None
    return stored_rows(weights)


def _segment_scales(scales, layout: _Layout, dtype) -> torch.Tensor:
    """(S, 1, 1) scale of each segment's adapter."""
    return layout.weights(scales).to(dtype)[:, None, None]


def sgmv_shrink(x, weights, batch: LoraBatch, scales=None, tables=None):
    """Semantics: h[s[i]:s[i+1]] = scale[slot[i]] * x[s[i]:s[i+1]] @ W[slot[i]].T"""
    layout = _layout(batch, x.device)
    if layout is None:
        return torch.zeros(x.shape[0], weights.shape[1], dtype=x.dtype, device=x.device)
    if (table := _stored_rows(layout, weights, x.dtype)) is not None:
        return shrink_rows(x, *table, weights.shape[1], layout.bags, scales)
    out = torch.bmm(layout.gather_rows(x),
                    layout.weights(weights).transpose(1, 2).to(x.dtype))  # (S, L, R)
    if scales is not None:
        out = out * _segment_scales(scales, layout, out.dtype)
    if layout.block == 0 and layout.num * layout.length == x.shape[0]:
        return out.view(x.shape[0], -1)  # every row has an adapter
    h = torch.zeros(x.shape[0], weights.shape[1], dtype=x.dtype, device=x.device)
    if layout.block is not None:
        h[layout.block:layout.block + layout.num * layout.length] = out.view(-1, out.shape[2])
    else:
        h[layout.targets] = out.view(-1, out.shape[2]).index_select(0, layout.picked)
    return h


def sgmv_expand(y, h, weights, batch: LoraBatch, scales=None, tables=None):
    """Semantics: y[s[i]:s[i+1]] += scale[slot[i]] * h[s[i]:s[i+1]] @ W[slot[i]].T (in place)"""
    layout = _layout(batch, y.device)
    if layout is None:
        return y
    if (table := _stored_rows(layout, weights, y.dtype)) is not None:
        return expand_rows(y, h, *table, layout.bags, scales)
    hs = layout.gather_rows(h).to(y.dtype)  # (S, L, R): scaled here, it is the small side
    if scales is not None:
        hs = hs * _segment_scales(scales, layout, hs.dtype)
    w = layout.weights(weights).transpose(1, 2).to(y.dtype)  # (S, R, d_out)
    if layout.block is not None:
        layout.gather_rows(y).baddbmm_(hs, w)  # a view of y: added in place
    else:
        out = torch.bmm(hs, w).view(-1, y.shape[1])
        y.index_add_(0, layout.targets, out.index_select(0, layout.picked))
    return y


def sgmv_shrink_slices(x, weights, batch: LoraBatch, tables=None):
    """Semantics: see sgmv_reference.sgmv_shrink_slices (here one op a slice)."""
    return shrink_each(sgmv_shrink, x, weights, batch)


def sgmv_expand_slices(y, h, weights, offsets, batch: LoraBatch, scales, tables=None):
    """Semantics: see sgmv_reference.sgmv_expand_slices (here one op a slice)."""
    return expand_each(sgmv_expand, y, h, weights, offsets, batch, scales)


def sgmv_weight_grad(grad_out, inputs, batch: LoraBatch, num_slots, scales=None):
    """Semantics: dW[slot] = sum over segments i of that slot of
                             scale[slot] * grad_out[s[i]:s[i+1]].T @ inputs[s[i]:s[i+1]]"""
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    grad = torch.zeros(num_slots, grad_out.shape[1], inputs.shape[1], dtype=dtype,
                       device=inputs.device)
    layout = _layout(batch, inputs.device)
    if layout is None:
        return grad
    g = layout.gather_rows(grad_out).to(dtype)
    if layout.block is None:  # padding cells contribute nothing
        keep = torch.zeros(layout.num * layout.length, 1, dtype=dtype, device=inputs.device)
        keep[layout.picked] = 1.0
        g = g * keep.view(layout.num, layout.length, 1)
    xs = layout.gather_rows(inputs).to(dtype)
    per_segment = torch.bmm(g.transpose(1, 2), xs)  # (S, d_out, d_in)
    if scales is not None:
        per_segment = per_segment * _segment_scales(scales, layout, dtype)
    return grad.index_add_(0, layout.slots, per_segment)


def _adapter_rows(batch: LoraBatch, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(every row that has an adapter, its slot) on `device`, None when there is none."""
    starts, slots = batch.starts, batch.slots
    lengths = starts[1:] - starts[:-1]
    keep = (slots >= 0) & (lengths > 0)
    if not bool(keep.any()):
        return None
    lengths, firsts = lengths[keep], starts[:-1][keep]
    before = torch.cumsum(lengths, 0) - lengths  # adapter rows before each segment
    rows = (firsts - before).repeat_interleave(lengths) + torch.arange(int(lengths.sum()))
    return rows.to(device), slots[keep].repeat_interleave(lengths).to(device)


def sgmv_rescale(y, gains, bias, batch: LoraBatch):
    """Semantics: see sgmv_reference.sgmv_rescale (in place)."""
    found = batch.derived(("torch rows", y.device), lambda: _adapter_rows(batch, y.device))
    if found is None:
        return y
    rows, slots = found
    part = y.index_select(0, rows).float()
    b = 0.0 if bias is None else bias.float()
    y.index_copy_(0, rows, (gains.index_select(0, slots) * (part - b) + b).to(y.dtype))
    return y
