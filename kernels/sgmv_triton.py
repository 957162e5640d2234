"""The segmented LoRA ops as Triton kernels: shrink, expand and the per-adapter weight
gradient, one launch per op over all segments of a batch.

Same semantics and signatures as `sgmv_reference`; the kernels are in `triton_kernels`. Two
shapes of launch:
  - segment kernels: a program covers one adapter segment, a block of its rows and a block of
    output columns, and multiplies with tl.dot (prefill, training, mixed batches);
  - per-row kernels, for decode (every adapter segment at most DECODE_MAX_ROWS rows): a
    program covers a block of rows, each reading its own adapter, so that short segments do
    not each take a mostly empty row block.
Each shrink and expand launch also covers the slices of a layer (q, k and v; gate and up),
each slice's pool, scales and output columns read from a table of addresses; a single op is
one slice. Segments with no adapter (slot -1) or no rows are dropped on the host, and
rows outside adapter segments are never written. Weight gradient: a program covers one adapter
and a block of its gradient, and sums over every segment of that adapter in batch order (no
atomics: the result is the same at every run). Pools are read through their strides:
row-major, transposed (as VirtualizedLinear stores them) or rank-sliced views alike.
Accumulation is float32 (float64 for float64 inputs). Block sizes: `triton_configs`.
"""

from __future__ import annotations

from functools import cached_property

import torch
import triton
import triton.language as tl

from cotune.kernels import sgmv_torch
from cotune.kernels.checks import check_expand, check_shrink, check_weight_grad
from cotune.kernels.lora_batch import LoraBatch
from cotune.kernels.triton_configs import DECODE_MAX_ROWS, rows_bucket
from cotune.kernels.triton_kernels import expand, expand_rows, shrink, shrink_rows, weight_grad

# The slices of a layer run in one launch: the model stores their weights side by side, so
# that their base GEMM is one too (loading.arranged).
FUSED_SLICES = True


class _Segments:
    """The adapter segments of a batch (slot >= 0, at least one row), on the host and on the
    device the kernels run on (copied there once per batch, see _segments), and the tables
    of addresses the batch's launches read (`table`)."""

    def __init__(self, starts: torch.Tensor, slots: torch.Tensor, device):
        keep = (slots >= 0) & (starts[1:] > starts[:-1])
        self.begins, self.ends, self.slots = starts[:-1][keep], starts[1:][keep], slots[keep]
        self.count = len(self.slots)
        lengths = self.ends - self.begins
        self.longest = int(lengths.max()) if self.count else 0
        self.rows = int(lengths.sum())
        self.last_row = int(self.ends.max()) if self.count else 0
        self.device = device
        self._tables: dict[tuple, torch.Tensor] = {}

    def table(self, rows: tuple, tables: dict | None) -> torch.Tensor:
        """`rows` as an int64 tensor on the device, copied there once into `tables` (the
        caller's, for pools that outlive the batch), or once per batch when it is None."""
        store = self._tables if tables is None else tables
        key = (rows, self.device)
        if key not in store:
            store[key] = torch.tensor(rows, dtype=torch.int64).to(self.device)
        return store[key]

    @property
    def decode(self) -> bool:
        """Short segments only: the per-row kernels fit better."""
        return self.longest <= DECODE_MAX_ROWS

    @cached_property
    def bounds(self) -> list[torch.Tensor]:
        """(begins, ends, slots) of the segments on the device."""
        return _on_device(self.device, self.begins, self.ends, self.slots)

    @cached_property
    def row_slots(self) -> torch.Tensor:
        """(last_row,) slot of every row up to the last adapter row, -1 outside adapter
        segments, on the device."""
        slots = torch.full((self.last_row,), -1, dtype=torch.int32)
        for begin, end, slot in zip(self.begins.tolist(), self.ends.tolist(),
                                    self.slots.tolist()):
            slots[begin:end] = slot
        return slots.to(self.device)

    @cached_property
    def by_adapter(self) -> list[torch.Tensor]:
        """The segments grouped by adapter, in batch order within a group: (group_ptr (G+1,),
        group_segs (K,), group_slots (G,)) on the device."""
        order = torch.sort(self.slots, stable=True).indices
        group_slots, counts = torch.unique_consecutive(self.slots[order], return_counts=True)
        group_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return _on_device(self.device, group_ptr, order, group_slots)


def _on_device(device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device=device, dtype=torch.int32) for t in tensors]


def _segments(batch: LoraBatch, device) -> _Segments:
    """The segments of a batch on `device`, worked out at its first op there."""
    return batch.derived(("triton segments", device),
                         lambda: _Segments(batch.starts, batch.slots, device))


def _accumulator(dtype: torch.dtype):
    """float32, or float64 for float64 tensors (gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _addresses(segs: _Segments, tensors, tables: dict | None) -> torch.Tensor:
    """The data addresses of `tensors` (0 for None) as an int64 table on the device."""
    return segs.table(tuple(0 if t is None else t.data_ptr() for t in tensors), tables)


def sgmv_shrink(x, weights, batch: LoraBatch, scales=None, tables=None):
    """Semantics: h[s[i]:s[i+1]] = scale[slot[i]] * x[s[i]:s[i+1]] @ W[slot[i]].T
    x (T, d_in), weights (N, R, d_in); h (T, R) in x's dtype, zero where no adapter.
    `tables`: a dict of the caller's where the device tables of its pools are kept across
    batches (pools that do not move, such as the resident slots); None: for this batch."""
    return _shrink_slices(x, [weights], batch, [scales], tables)


def sgmv_shrink_slices(x, weights, batch: LoraBatch, tables=None):
    """Semantics: h[:, j*R:(j+1)*R] = sgmv_shrink(x, weights[j], batch) for every slice j,
    in one launch when the pools share their layout.
    x (T, d_in), weights J pools (N, R, d_in) of one shape; h (T, J*R)."""
    if all(w.stride() == weights[0].stride() for w in weights):
        return _shrink_slices(x, weights, batch, [None] * len(weights), tables)
    return torch.cat([sgmv_shrink(x, w, batch, tables=tables) for w in weights], dim=1)


def _shrink_slices(x, weights, batch: LoraBatch, scales, tables):
    check_shrink(x, weights, batch, scales)
    num_rows, d_in = x.shape
    rank, count = weights[0].shape[1], len(weights)
    h = torch.zeros(num_rows, count * rank, dtype=x.dtype, device=x.device)
    segs = _segments(batch, x.device)
    if segs.count == 0 or rank == 0:
        return h
    has_scale = scales[0] is not None
    args = (weights[0], _addresses(segs, weights, tables), scales[0] if has_scale else h,
            _addresses(segs, scales, tables), h)
    strides = (x.stride(0), x.stride(1), *weights[0].stride(), h.stride(0), h.stride(1))
    common = dict(HAS_SCALE=has_scale, ACC=_accumulator(x.dtype))
    if segs.decode:
        shrink_rows[lambda meta: (triton.cdiv(segs.last_row, meta["BLOCK_M"]),
                                   count * triton.cdiv(rank, meta["BLOCK_R"]))](
            x, *args, segs.row_slots, segs.last_row, d_in, rank, rows_bucket(segs.rows),
            *strides, **common)
    else:
        shrink[lambda meta: (segs.count, triton.cdiv(segs.longest, meta["BLOCK_M"]),
                              count * triton.cdiv(rank, meta["BLOCK_R"]))](
            x, *args, *segs.bounds, d_in, rank, rows_bucket(segs.longest), *strides,
            **common)
    return h


def sgmv_expand(y, h, weights, batch: LoraBatch, scales=None, tables=None):
    """Semantics: y[s[i]:s[i+1]] += scale[slot[i]] * h[s[i]:s[i+1]] @ W[slot[i]].T (in place)
    y (T, d_out), h (T, R), weights (N, d_out, R). Rows without an adapter are not written."""
    return _expand_slices(y, h, [weights], [0], batch, [scales], tables)


def sgmv_expand_slices(y, h, weights, offsets, batch: LoraBatch, scales, tables=None):
    """Semantics: y[:, o_j:o_j+d_j] += sgmv_expand of h[:, j*R:(j+1)*R] through weights[j]
    (N, d_j, R) with scales[j], for every slice j, in one launch (in place).
    y (T, >= o_j + d_j), h (T, J*R), offsets: each slice's first column in y."""
    return _expand_slices(y, h, weights, offsets, batch, scales, tables)


def _slice_table(segs: _Segments, weights, offsets, scales, tables) -> torch.Tensor:
    """(J, 6) int64: each slice's pool address, scales address (0: none), first column in y,
    width, and pool strides along N and R (the stride along d_out is shared)."""
    rows = tuple((w.data_ptr(), 0 if s is None else s.data_ptr(), offset, w.shape[1],
                  w.stride(0), w.stride(2)) for w, offset, s in zip(weights, offsets, scales))
    return segs.table(rows, tables)


def _expand_slices(y, h, weights, offsets, batch: LoraBatch, scales, tables):
    check_expand(y, h, weights, offsets, batch, scales)
    rank, count = weights[0].shape[2], len(weights)
    if any(w.stride(1) != weights[0].stride(1) for w in weights):  # one launch a slice
        for j, (w, offset, s) in enumerate(zip(weights, offsets, scales)):
            _expand_slices(y, h[:, j * rank:(j + 1) * rank], [w], [offset], batch, [s],
                           tables)
        return y
    if rank == 0:
        return y
    segs = _segments(batch, y.device)
    if segs.count == 0:
        return y
    has_scale = scales[0] is not None
    widest = max(w.shape[1] for w in weights)
    args = (weights[0], scales[0] if has_scale else y,
            _slice_table(segs, weights, offsets, scales, tables))
    strides = (y.stride(0), y.stride(1), h.stride(0), h.stride(1), weights[0].stride(1))
    common = dict(HAS_SCALE=has_scale, ACC=_accumulator(y.dtype))
    if segs.decode:
        expand_rows[lambda meta: (triton.cdiv(segs.last_row, meta["BLOCK_M"]),
                                   count * triton.cdiv(widest, meta["BLOCK_N"]))](
            y, h, *args, segs.row_slots, segs.last_row, widest, rank,
            rows_bucket(segs.rows), *strides, **common)
    else:
        expand[lambda meta: (segs.count, triton.cdiv(segs.longest, meta["BLOCK_M"]),
                              count * triton.cdiv(widest, meta["BLOCK_N"]))](
            y, h, *args, *segs.bounds, widest, rank, rows_bucket(segs.longest), *strides,
            **common)
    return y


def sgmv_weight_grad(grad_out, inputs, batch: LoraBatch, num_slots, scales=None):
    """Semantics: dW[slot] = sum over segments i of that slot of
                             scale[slot] * grad_out[s[i]:s[i+1]].T @ inputs[s[i]:s[i+1]]
    grad_out (T, d_out), inputs (T, d_in); dW (num_slots, d_out, d_in) in float32 (float64
    for float64 inputs); slots no segment uses are zero."""
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    d_out, d_in = grad_out.shape[1], inputs.shape[1]
    check_weight_grad(grad_out, inputs, batch, num_slots, scales)
    grad = torch.zeros(num_slots, d_out, d_in, dtype=dtype, device=inputs.device)
    segs = _segments(batch, inputs.device)
    if segs.count == 0:
        return grad
    group_ptr, group_segs, group_slots = segs.by_adapter
    weight_grad[lambda meta: (len(group_slots), triton.cdiv(d_out, meta["BLOCK_O"]),
                               triton.cdiv(d_in, meta["BLOCK_I"]))](
        grad_out, inputs, grad if scales is None else scales, grad, group_ptr, group_segs,
        group_slots, *segs.bounds[:2], d_out, d_in, rows_bucket(segs.rows), grad_out.stride(0),
        grad_out.stride(1), inputs.stride(0), inputs.stride(1), *grad.stride(),
        HAS_SCALE=scales is not None, ACC=_accumulator(dtype))
    return grad


def sgmv_rescale(y, gains, bias, batch: LoraBatch):
    """Semantics: see sgmv_reference.sgmv_rescale (in place). Elementwise over the rows: torch's
    own ops, as the batched torch implementation runs them."""
    return sgmv_torch.sgmv_rescale(y, gains, bias, batch)
