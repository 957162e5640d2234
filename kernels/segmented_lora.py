"""The LoRA delta of a segmented batch as one differentiable op."""

from __future__ import annotations

from types import ModuleType

import torch

from cotune.kernels.lora_batch import LoraBatch


class SegmentedLora(torch.autograd.Function):
    """Semantics: delta[s[i]:s[i+1]] = scale[k] * x[s[i]:s[i+1]] @ A[k].T @ B[k].T, k = slot[i]

    Forward (h is the rank-R intermediate, one per row):
        h     = x @ A.T                         # shrink, (T, R)
        delta = scale * h @ B.T                 # expand, (T, d_out)
    Backward, per segment of slot k (rows without an adapter get zero gradient):
        dh    = scale * d_delta @ B             # shrink of d_delta through B.T, (T, R)
        dx    = dh @ A                          # expand through A.T, (T, d_in)
        dA[k] = sum_rows dh.T @ x               # (R, d_in)
        dB[k] = sum_rows scale * d_delta.T @ h  # (d_out, R)

    x: (T, d_in)   a_pool: (N, R, d_in)   b_pool: (N, d_out, R)   scales: (N,) float32
    batch: the segments (LoraBatch)   ops: the implementation of the segmented ops
    """

    @staticmethod
    def forward(ctx, x, a_pool, b_pool, scales, batch: LoraBatch, ops: ModuleType):
        h = ops.sgmv_shrink(x, a_pool, batch)
        delta = torch.zeros(x.shape[0], b_pool.shape[1], dtype=x.dtype, device=x.device)
        ops.sgmv_expand(delta, h, b_pool, batch, scales)
        ctx.save_for_backward(x, h, a_pool, b_pool, scales)
        ctx.batch, ctx.ops = batch, ops
        return delta

    @staticmethod
    def backward(ctx, d_delta):
        x, h, a_pool, b_pool, scales = ctx.saved_tensors
        batch, ops = ctx.batch, ctx.ops
        num_slots = a_pool.shape[0]
        d_delta = d_delta.contiguous()
        # dh = scale * d_delta @ B: a shrink whose pool is B transposed, (N, R, d_out)
        dh = ops.sgmv_shrink(d_delta, b_pool.transpose(1, 2), batch, scales)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            # dx = dh @ A: an expand whose pool is A transposed, (N, d_in, R)
            dx = torch.zeros_like(x)
            ops.sgmv_expand(dx, dh, a_pool.transpose(1, 2), batch)
        if ctx.needs_input_grad[1]:
            da = ops.sgmv_weight_grad(dh, x, batch, num_slots).to(a_pool.dtype)
        if ctx.needs_input_grad[2]:
            db = ops.sgmv_weight_grad(d_delta, h, batch, num_slots, scales).to(b_pool.dtype)
        return dx, da, db, None, None, None


def segmented_lora(x, a_pool, b_pool, scales, batch: LoraBatch, ops: ModuleType
                   ) -> torch.Tensor:
    """The LoRA delta (T, d_out) of every row; see SegmentedLora for the semantics."""
    return SegmentedLora.apply(x, a_pool, b_pool, scales, batch, ops)
