"""Segmented LoRA shrink and expand as Triton kernels: the first increment of the kernels
issue (forward only; not yet chosen by COTUNE_KERNELS, which needs the backward kernels too).

Same semantics as `sgmv_reference`, one launch per op over all segments of a batch. A program
covers one segment, a block of its rows and a block of output columns; rows beyond the
segment and segments with no adapter (slot -1) are masked, so their rows are never written.
Pools are read through their strides: row-major, transposed (as VirtualizedLinear stores
them) or rank-sliced views alike. Accumulation is float32."""

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
                   HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    rows, row_ok, used = _segment_rows(starts_ptr, slots_ptr, BLOCK_M)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & (ks[None, :] < d_in), other=0.0)
        w = tl.load(w_ptr + used * stride_ws + ranks[None, :] * stride_wr
                    + ks[:, None] * stride_wk,
                    mask=(ranks[None, :] < rank) & (ks[:, None] < d_in), other=0.0)
        acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + used).to(tl.float32)
    tl.store(h_ptr + rows[:, None] * stride_ht + ranks[None, :] * stride_hr,
             acc.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (ranks[None, :] < rank))


@triton.jit
def _expand_kernel(y_ptr, h_ptr, w_ptr, scale_ptr, starts_ptr, slots_ptr, d_out, rank,
                   stride_yt, stride_yn, stride_ht, stride_hr, stride_ws, stride_wn, stride_wr,
                   HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    rows, row_ok, used = _segment_rows(starts_ptr, slots_ptr, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + rows[:, None] * stride_ht + rs[None, :] * stride_hr,
                    mask=row_ok[:, None] & (rs[None, :] < rank), other=0.0)
        w = tl.load(w_ptr + used * stride_ws + cols[None, :] * stride_wn
                    + rs[:, None] * stride_wr,
                    mask=(cols[None, :] < d_out) & (rs[:, None] < rank), other=0.0)
        acc += tl.dot(h.to(tl.float32), w.to(tl.float32))
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + used).to(tl.float32)
    out = y_ptr + rows[:, None] * stride_yt + cols[None, :] * stride_yn
    keep = row_ok[:, None] & (cols[None, :] < d_out)
    y = tl.load(out, mask=keep, other=0.0)
    tl.store(out, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=keep)


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
        h.stride(0), h.stride(1), HAS_SCALE=scales is not None, BLOCK_M=BLOCK_M,
        BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
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
        weights.stride(1), weights.stride(2), HAS_SCALE=scales is not None, BLOCK_M=BLOCK_M,
        BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N)
    return y
