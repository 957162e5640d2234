"""The segmented LoRA ops as Triton kernels: shrink, expand and the per-adapter weight
gradient, one launch per op over all segments of a batch.

Same semantics and signatures as `sgmv_reference`. Shrink and expand: a program covers one
segment, a block of its rows and a block of output columns; rows beyond the segment and
segments with no adapter (slot -1) are masked, so their rows are never written. Weight
gradient: a program covers one adapter and a block of its gradient, and sums over every
segment of that adapter in order (no atomics: the result is the same at every run).
Pools are read through their strides: row-major, transposed (as VirtualizedLinear stores
them) or rank-sliced views alike. Accumulation is float32 (float64 for float64 inputs)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_N = 16, 32, 16, 32


@triton.jit
def _segment_rows(starts_ptr, slots_ptr, BLOCK_M: tl.constexpr):
    """This program's rows (segment program_id(0), row block program_id(1)), which of them to
    write (inside the segment, and the segment has an adapter), and the slot to read (0 for
    none: every load it guards is masked)."""
    seg = tl.program_id(0)
    start = tl.load(starts_ptr + seg)
    end = tl.load(starts_ptr + seg + 1)
    slot = tl.load(slots_ptr + seg)
    rows = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, (rows < end) & (slot >= 0), tl.maximum(slot, 0)


@triton.jit
def _shrink_kernel(x_ptr, w_ptr, scale_ptr, h_ptr, starts_ptr, slots_ptr, d_in, rank,
                   stride_xt, stride_xk, stride_ws, stride_wr, stride_wk, stride_ht, stride_hr,
                   HAS_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rows, row_ok, used = _segment_rows(starts_ptr, slots_ptr, BLOCK_M)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, ACC)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & (ks[None, :] < d_in), other=0.0)
        w = tl.load(w_ptr + used * stride_ws + ranks[None, :] * stride_wr
                    + ks[:, None] * stride_wk,
                    mask=(ranks[None, :] < rank) & (ks[:, None] < d_in), other=0.0)
        acc += tl.dot(x.to(ACC), w.to(ACC))
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + used).to(ACC)
    tl.store(h_ptr + rows[:, None] * stride_ht + ranks[None, :] * stride_hr,
             acc.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (ranks[None, :] < rank))


@triton.jit
def _expand_kernel(y_ptr, h_ptr, w_ptr, scale_ptr, starts_ptr, slots_ptr, d_out, rank,
                   stride_yt, stride_yn, stride_ht, stride_hr, stride_ws, stride_wn, stride_wr,
                   HAS_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, row_ok, used = _segment_rows(starts_ptr, slots_ptr, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
    for r0 in range(0, rank, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + rows[:, None] * stride_ht + rs[None, :] * stride_hr,
                    mask=row_ok[:, None] & (rs[None, :] < rank), other=0.0)
        w = tl.load(w_ptr + used * stride_ws + cols[None, :] * stride_wn
                    + rs[:, None] * stride_wr,
                    mask=(cols[None, :] < d_out) & (rs[:, None] < rank), other=0.0)
        acc += tl.dot(h.to(ACC), w.to(ACC))
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + used).to(ACC)
    out = y_ptr + rows[:, None] * stride_yt + cols[None, :] * stride_yn
    keep = row_ok[:, None] & (cols[None, :] < d_out)
    y = tl.load(out, mask=keep, other=0.0)
    tl.store(out, (y.to(ACC) + acc).to(y_ptr.dtype.element_ty), mask=keep)


def _accumulator(dtype: torch.dtype):
    """float32, or float64 for float64 tensors (gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _segment_args(seg_starts: torch.Tensor, seg_slots: torch.Tensor, device):
    """(starts, slots) as int32 on `device`, and the row blocks per segment (enough for the
    longest one)."""
    longest = int((seg_starts[1:] - seg_starts[:-1]).max())
    return (seg_starts.to(device=device, dtype=torch.int32),
            seg_slots.to(device=device, dtype=torch.int32), triton.cdiv(max(longest, 1), BLOCK_M))


def sgmv_shrink(x, weights, seg_starts, seg_slots, scales=None):
    """Semantics: h[s[i]:s[i+1]] = scale[slot[i]] * x[s[i]:s[i+1]] @ W[slot[i]].T
    x (T, d_in), weights (N, R, d_in); h (T, R) in x's dtype, zero where no adapter."""
    rank = weights.shape[1]
    h = torch.zeros(x.shape[0], rank, dtype=x.dtype, device=x.device)
    num_segments = len(seg_slots)
    if num_segments == 0 or x.shape[0] == 0:
        return h
    starts, slots, row_blocks = _segment_args(seg_starts, seg_slots, x.device)
    grid = (num_segments, row_blocks, triton.cdiv(rank, BLOCK_R))
    _shrink_kernel[grid](
        x, weights, h if scales is None else scales, h, starts, slots, x.shape[1], rank,
        x.stride(0), x.stride(1), weights.stride(0), weights.stride(1), weights.stride(2),
        h.stride(0), h.stride(1), HAS_SCALE=scales is not None, ACC=_accumulator(x.dtype),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
    return h


def sgmv_expand(y, h, weights, seg_starts, seg_slots, scales=None):
    """Semantics: y[s[i]:s[i+1]] += scale[slot[i]] * h[s[i]:s[i+1]] @ W[slot[i]].T (in place)
    y (T, d_out), h (T, R), weights (N, d_out, R). Rows without an adapter are not written."""
    num_segments = len(seg_slots)
    if num_segments == 0 or y.shape[0] == 0:
        return y
    starts, slots, row_blocks = _segment_args(seg_starts, seg_slots, y.device)
    rank, d_out = weights.shape[2], weights.shape[1]
    grid = (num_segments, row_blocks, triton.cdiv(d_out, BLOCK_N))
    _expand_kernel[grid](
        y, h, weights, y if scales is None else scales, starts, slots, d_out, rank,
        y.stride(0), y.stride(1), h.stride(0), h.stride(1), weights.stride(0),
        weights.stride(1), weights.stride(2), HAS_SCALE=scales is not None,
        ACC=_accumulator(y.dtype), BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N)
    return y


@triton.jit
def _weight_grad_kernel(g_ptr, x_ptr, scale_ptr, dw_ptr, group_ptr, group_segs_ptr,
                        group_slots_ptr, starts_ptr, d_out, d_in, stride_gt, stride_go,
                        stride_xt, stride_xi, stride_ws, stride_wo, stride_wi,
                        HAS_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    group = tl.program_id(0)
    slot = tl.load(group_slots_ptr + group)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    ins = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.full((BLOCK_O, BLOCK_I), 0.0, ACC)
    for j in range(tl.load(group_ptr + group), tl.load(group_ptr + group + 1)):
        seg = tl.load(group_segs_ptr + j)
        start = tl.load(starts_ptr + seg)
        end = tl.load(starts_ptr + seg + 1)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            g_t = tl.load(g_ptr + rows[None, :] * stride_gt + outs[:, None] * stride_go,
                          mask=(rows[None, :] < end) & (outs[:, None] < d_out), other=0.0)
            x = tl.load(x_ptr + rows[:, None] * stride_xt + ins[None, :] * stride_xi,
                        mask=(rows[:, None] < end) & (ins[None, :] < d_in), other=0.0)
            acc += tl.dot(g_t.to(ACC), x.to(ACC))
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slot).to(ACC)
    tl.store(dw_ptr + slot * stride_ws + outs[:, None] * stride_wo + ins[None, :] * stride_wi,
             acc, mask=(outs[:, None] < d_out) & (ins[None, :] < d_in))


def _adapter_groups(seg_starts: torch.Tensor, seg_slots: torch.Tensor, device):
    """The segments with rows and an adapter, grouped by adapter (in batch order within a
    group): (group_ptr (G+1,), group_segs (K,), group_slots (G,)) as int32 on `device`."""
    lengths = seg_starts[1:] - seg_starts[:-1]
    used = ((seg_slots >= 0) & (lengths > 0)).nonzero()[:, 0]
    order = torch.sort(seg_slots[used], stable=True).indices
    segs = used[order]
    group_slots, counts = torch.unique_consecutive(seg_slots[segs], return_counts=True)
    group_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return tuple(t.to(device=device, dtype=torch.int32) for t in (group_ptr, segs, group_slots))


def sgmv_weight_grad(grad_out, inputs, seg_starts, seg_slots, num_slots, scales=None):
    """Semantics: dW[slot] = sum over segments i of that slot of
                             scale[slot] * grad_out[s[i]:s[i+1]].T @ inputs[s[i]:s[i+1]]
    grad_out (T, d_out), inputs (T, d_in); dW (num_slots, d_out, d_in) in float32 (float64
    for float64 inputs); slots no segment uses are zero."""
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    d_out, d_in = grad_out.shape[1], inputs.shape[1]
    grad = torch.zeros(num_slots, d_out, d_in, dtype=dtype, device=inputs.device)
    group_ptr, group_segs, group_slots = _adapter_groups(seg_starts.cpu(), seg_slots.cpu(),
                                                         inputs.device)
    if len(group_slots) == 0:
        return grad
    starts = seg_starts.to(device=inputs.device, dtype=torch.int32)
    grid = (len(group_slots), triton.cdiv(d_out, BLOCK_N), triton.cdiv(d_in, BLOCK_N))
    _weight_grad_kernel[grid](
        grad_out, inputs, grad if scales is None else scales, grad, group_ptr, group_segs,
        group_slots, starts, d_out, d_in, grad_out.stride(0), grad_out.stride(1),
        inputs.stride(0), inputs.stride(1), grad.stride(0), grad.stride(1), grad.stride(2),
        HAS_SCALE=scales is not None, ACC=_accumulator(dtype),
        BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_N, BLOCK_I=BLOCK_N)
    return grad
