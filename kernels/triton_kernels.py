"""The Triton kernels behind `sgmv_triton` (which launches them and documents the ops).

Program layouts:
  - segment kernels (_shrink_kernel, _expand_kernel): program_id(0) is an adapter segment,
    program_id(1) a block of its rows, program_id(2) a slice and a block of output columns;
    they multiply with tl.dot;
  - per-row kernels (_shrink_rows_kernel, _expand_rows_kernel): program_id(0) is a block of
    rows, each reading its own adapter (row_slots), program_id(1) a slice and a block of
    output columns; they multiply and sum, with no minimum block size;
  - the weight gradient: program_id(0) is an adapter, (1, 2) a block of its gradient.
A slice's pool, scales and place in the output come from a table of addresses (int64); the
pointer arguments named like them only give the element types.
"""

from __future__ import annotations

import triton
import triton.language as tl

from cotune.kernels.triton_configs import tuned


@triton.jit
def _segment_rows(begins_ptr, ends_ptr, slots_ptr, BLOCK_M: tl.constexpr):
    """This program's rows (adapter segment program_id(0), row block program_id(1)), which of
    them are inside the segment, and the segment's slot."""
    seg = tl.program_id(0)
    end = tl.load(ends_ptr + seg)
    rows = tl.load(begins_ptr + seg) + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < end, tl.load(slots_ptr + seg)


@triton.jit
def _row_block(row_slots_ptr, num_rows, BLOCK_M: tl.constexpr):
    """This program's rows (row block program_id(0)), which of them have an adapter, and each
    row's slot (0 for rows without one: every load it guards is masked)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(row_slots_ptr + rows, mask=rows < num_rows, other=-1)
    return rows, slot >= 0, tl.maximum(slot, 0)


@triton.jit
def _shrink_slice(w_ptr, w_table, scale_ptr, scale_table, h_ptr, rank, stride_hr,
                  AXIS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program axis AXIS spans slices x rank blocks: this program's pool (its address from
    w_table), scales (from scale_table), output columns in h (slice j writes columns
    j*rank...), and its block of ranks. w_ptr and scale_ptr give the element types."""
    blocks = tl.cdiv(rank, BLOCK_R)
    j = tl.program_id(AXIS) // blocks
    w = tl.load(w_table + j).to(tl.pointer_type(w_ptr.dtype.element_ty))
    scale = tl.load(scale_table + j).to(tl.pointer_type(scale_ptr.dtype.element_ty))
    ranks = (tl.program_id(AXIS) % blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    return w, scale, h_ptr + j * rank * stride_hr, ranks


@triton.jit
def _expand_slice(w_ptr, scale_ptr, table, d_out, rank, stride_hr, AXIS: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Program axis AXIS spans slices x column blocks of the widest slice (d_out): this
    program's pool, scales, first column of y, width, pool strides (N and R) and columns of
    its slice, read from row j of table (see _slice_table), and the offset of slice j's
    columns in h."""
    blocks = tl.cdiv(d_out, BLOCK_N)
    j = tl.program_id(AXIS) // blocks
    row = table + j * 6
    w = tl.load(row).to(tl.pointer_type(w_ptr.dtype.element_ty))
    scale = tl.load(row + 1).to(tl.pointer_type(scale_ptr.dtype.element_ty))
    cols = (tl.program_id(AXIS) % blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return (w, scale, tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5),
            cols, j * rank * stride_hr)


@triton.jit
def _shrink_kernel(x_ptr, w_ptr, w_table, scale_ptr, scale_table, h_ptr, begins_ptr, ends_ptr,
                   slots_ptr, d_in, rank, rows_bucket, stride_xt, stride_xk, stride_ws,
                   stride_wr, stride_wk, stride_ht, stride_hr, HAS_SCALE: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    rows, row_ok, slot = _segment_rows(begins_ptr, ends_ptr, slots_ptr, BLOCK_M)
    w_ptr, scale_ptr, h_ptr, ranks = _shrink_slice(w_ptr, w_table, scale_ptr, scale_table,
                                                   h_ptr, rank, stride_hr, 2, BLOCK_R)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, ACC)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & (ks[None, :] < d_in), other=0.0)
        w = tl.load(w_ptr + slot * stride_ws + ranks[None, :] * stride_wr
                    + ks[:, None] * stride_wk,
                    mask=(ranks[None, :] < rank) & (ks[:, None] < d_in), other=0.0)
        acc += tl.dot(x.to(ACC), w.to(ACC))
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slot).to(ACC)
    tl.store(h_ptr + rows[:, None] * stride_ht + ranks[None, :] * stride_hr,
             acc.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (ranks[None, :] < rank))


@triton.jit
def _expand_kernel(y_ptr, h_ptr, w_ptr, scale_ptr, table, begins_ptr, ends_ptr, slots_ptr,
                   d_out, rank, rows_bucket, stride_yt, stride_yn, stride_ht, stride_hr,
                   stride_wn, HAS_SCALE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, row_ok, slot = _segment_rows(begins_ptr, ends_ptr, slots_ptr, BLOCK_M)
    w_ptr, scale_ptr, first_col, width, stride_ws, stride_wr, cols, h_cols = _expand_slice(
        w_ptr, scale_ptr, table, d_out, rank, stride_hr, 2, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
    for r0 in range(0, rank, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + h_cols + rows[:, None] * stride_ht + rs[None, :] * stride_hr,
                    mask=row_ok[:, None] & (rs[None, :] < rank), other=0.0)
        w = tl.load(w_ptr + slot * stride_ws + cols[None, :] * stride_wn
                    + rs[:, None] * stride_wr,
                    mask=(cols[None, :] < width) & (rs[:, None] < rank), other=0.0)
        acc += tl.dot(h.to(ACC), w.to(ACC))
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slot).to(ACC)
    out = y_ptr + rows[:, None] * stride_yt + (first_col + cols[None, :]) * stride_yn
    keep = row_ok[:, None] & (cols[None, :] < width)
    y = tl.load(out, mask=keep, other=0.0)
    tl.store(out, (y.to(ACC) + acc).to(y_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _shrink_rows_kernel(x_ptr, w_ptr, w_table, scale_ptr, scale_table, h_ptr, row_slots_ptr,
                        num_rows, d_in, rank, rows_bucket, stride_xt, stride_xk, stride_ws,
                        stride_wr, stride_wk, stride_ht, stride_hr, HAS_SCALE: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    rows, row_ok, slot = _row_block(row_slots_ptr, num_rows, BLOCK_M)
    w_ptr, scale_ptr, h_ptr, ranks = _shrink_slice(w_ptr, w_table, scale_ptr, scale_table,
                                                   h_ptr, rank, stride_hr, 1, BLOCK_R)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, ACC)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & (ks[None, :] < d_in), other=0.0)
        w = tl.load(w_ptr + slot[:, None, None] * stride_ws + ranks[None, :, None] * stride_wr
                    + ks[None, None, :] * stride_wk,
                    mask=row_ok[:, None, None] & (ranks[None, :, None] < rank)
                    & (ks[None, None, :] < d_in), other=0.0)
        acc += tl.sum(x.to(ACC)[:, None, :] * w.to(ACC), axis=2)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(ACC)[:, None]
    tl.store(h_ptr + rows[:, None] * stride_ht + ranks[None, :] * stride_hr,
             acc.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (ranks[None, :] < rank))


@triton.jit
def _expand_rows_kernel(y_ptr, h_ptr, w_ptr, scale_ptr, table, row_slots_ptr, num_rows, d_out,
                        rank, rows_bucket, stride_yt, stride_yn, stride_ht, stride_hr,
                        stride_wn, HAS_SCALE: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, row_ok, slot = _row_block(row_slots_ptr, num_rows, BLOCK_M)
    w_ptr, scale_ptr, first_col, width, stride_ws, stride_wr, cols, h_cols = _expand_slice(
        w_ptr, scale_ptr, table, d_out, rank, stride_hr, 1, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
    for r0 in range(0, rank, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + h_cols + rows[:, None] * stride_ht + rs[None, :] * stride_hr,
                    mask=row_ok[:, None] & (rs[None, :] < rank), other=0.0)
        w = tl.load(w_ptr + slot[:, None, None] * stride_ws + cols[None, :, None] * stride_wn
                    + rs[None, None, :] * stride_wr,
                    mask=row_ok[:, None, None] & (cols[None, :, None] < width)
                    & (rs[None, None, :] < rank), other=0.0)
        acc += tl.sum(h.to(ACC)[:, None, :] * w.to(ACC), axis=2)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(ACC)[:, None]
    out = y_ptr + rows[:, None] * stride_yt + (first_col + cols[None, :]) * stride_yn
    keep = row_ok[:, None] & (cols[None, :] < width)
    y = tl.load(out, mask=keep, other=0.0)
    tl.store(out, (y.to(ACC) + acc).to(y_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _weight_grad_kernel(g_ptr, x_ptr, scale_ptr, dw_ptr, group_ptr, group_segs_ptr,
                        group_slots_ptr, begins_ptr, ends_ptr, d_out, d_in, rows_bucket,
                        stride_gt, stride_go, stride_xt, stride_xi, stride_ws, stride_wo,
                        stride_wi, HAS_SCALE: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    group = tl.program_id(0)
    slot = tl.load(group_slots_ptr + group)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    ins = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.full((BLOCK_O, BLOCK_I), 0.0, ACC)
    for j in range(tl.load(group_ptr + group), tl.load(group_ptr + group + 1)):
        seg = tl.load(group_segs_ptr + j)
        end = tl.load(ends_ptr + seg)
        for m0 in range(tl.load(begins_ptr + seg), end, BLOCK_M):
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


# The kernels as launched: autotuned over triton_configs' candidates on a GPU.
shrink = tuned("shrink", _shrink_kernel)
expand = tuned("expand", _expand_kernel, restore=("y_ptr",))
shrink_rows = tuned("shrink_rows", _shrink_rows_kernel)
expand_rows = tuned("expand_rows", _expand_rows_kernel, restore=("y_ptr",))
weight_grad = tuned("weight_grad", _weight_grad_kernel)
