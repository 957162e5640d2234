"""Segmented LoRA ops in plain torch: the reference twins of the Triton kernels.

A flat batch of T rows is cut into S contiguous segments (`batch`, a LoraBatch): segment i
covers rows `s[i]:s[i+1]` and uses the adapter in slot `slot[i]` of a pool, or none when the
slot is -1. Pools are padded to a common max rank R with zeros.

Every op computes in float32 or wider (written for clarity, not speed) and writes the result
in the dtype of its output. Rows outside an adapter segment are never written by an expand.
"""

from __future__ import annotations

import torch

from cotune.kernels.lora_batch import LoraBatch
from cotune.kernels.slices import expand_each, shrink_each

# The slices of a layer run one op at a time: the model need not store their weights together.
FUSED_SLICES = False


def _segments(batch: LoraBatch):
    """Yields (start, end, slot) for every segment that has an adapter."""
    starts = batch.starts.tolist()
    for i, slot in enumerate(batch.slots.tolist()):
        if slot >= 0 and starts[i + 1] > starts[i]:
            yield starts[i], starts[i + 1], slot


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 when it already is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _row_scale(scales: torch.Tensor | None, slot: int) -> float:
    return 1.0 if scales is None else float(scales[slot])


def sgmv_shrink(
    x: torch.Tensor,
    weights: torch.Tensor,
    batch: LoraBatch,
    scales: torch.Tensor | None = None,
    tables: dict | None = None,
) -> torch.Tensor:
    """Semantics: h[s[i]:s[i+1]] = scale[slot[i]] * x[s[i]:s[i+1]] @ W[slot[i]].T

    x:       (T, d_in)
    weights: (N, R, d_in)  the A pool (or B transposed, for backward)
    scales:  (N,) float32, or None for 1
    tables:  where an implementation keeps what it derives from pools that outlive the
             batch (the Triton kernels' device tables); unused here
    returns h: (T, R) in x's dtype; rows without an adapter are zero.
    """
    h = torch.zeros(x.shape[0], weights.shape[1], dtype=x.dtype, device=x.device)
    for start, end, slot in _segments(batch):
        rows = _wide(x[start:end]) @ _wide(weights[slot]).T  # (n, R)
        h[start:end] = (_row_scale(scales, slot) * rows).to(h.dtype)
    return h


def sgmv_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    weights: torch.Tensor,
    batch: LoraBatch,
    scales: torch.Tensor | None = None,
    tables: dict | None = None,
) -> torch.Tensor:
    """Semantics: y[s[i]:s[i+1]] += scale[slot[i]] * h[s[i]:s[i+1]] @ W[slot[i]].T  (in place)

    y:       (T, d_out), updated in place and returned
    h:       (T, R)
    weights: (N, d_out, R)  the B pool (or A transposed, for backward)
    scales:  (N,) float32, or None for 1
    """
    for start, end, slot in _segments(batch):
        delta = _wide(h[start:end]) @ _wide(weights[slot]).T  # (n, d_out)
        y[start:end] = (_wide(y[start:end]) + _row_scale(scales, slot) * delta).to(y.dtype)
    return y


def sgmv_shrink_slices(x, weights, batch: LoraBatch, tables=None) -> torch.Tensor:
    """Semantics: h[:, j*R:(j+1)*R] = sgmv_shrink(x, weights[j], batch) for
    every slice j: the LoRA A of several projections that read the same x (q, k and v).

    weights: J pools (N, R, d_in) of one rank R; returns h (T, J*R).
    """
    return shrink_each(sgmv_shrink, x, weights, batch)


def sgmv_expand_slices(y, h, weights, offsets, batch: LoraBatch, scales,
                       tables=None) -> torch.Tensor:
    """Semantics: y[:, o_j:o_j+d_j] += sgmv_expand of h[:, j*R:(j+1)*R] through weights[j]
    with scales[j], for every slice j (in place): the LoRA B of projections whose outputs are
    columns of one y.

    y: (T, >= o_j + d_j)   h: (T, J*R)   weights: J pools (N, d_j, R)
    offsets: each slice's first column in y   scales: J tensors (N,) or None
    """
    return expand_each(sgmv_expand, y, h, weights, offsets, batch, scales)


def sgmv_weight_grad(
    grad_out: torch.Tensor,
    inputs: torch.Tensor,
    batch: LoraBatch,
    num_slots: int,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics: dW[slot] = sum over segments i of that slot of
                             scale[slot] * grad_out[s[i]:s[i+1]].T @ inputs[s[i]:s[i+1]]

    The gradient of a segmented product `out = scale * inputs @ W[slot].T` with respect to
    the pool W, reduced per adapter over all of that adapter's rows.
    grad_out: (T, d_out)   inputs: (T, d_in)
    returns dW: (num_slots, d_out, d_in) in float32 or wider; slots no segment uses are zero.
    """
    grad = torch.zeros(num_slots, grad_out.shape[1], inputs.shape[1],
                       dtype=_wide(inputs[:0]).dtype, device=inputs.device)
    for start, end, slot in _segments(batch):
        grad[slot] += _row_scale(scales, slot) * (_wide(grad_out[start:end]).T
                                                  @ _wide(inputs[start:end]))
    return grad


def sgmv_rescale(
    y: torch.Tensor,
    gains: torch.Tensor,
    bias: torch.Tensor | None,
    batch: LoraBatch,
) -> torch.Tensor:
    """Semantics: y[s[i]:s[i+1]] = g[slot[i]] * (y[s[i]:s[i+1]] - bias) + bias  (in place)

    DoRA's output of its rows: y holds x W^T + bias + the LoRA delta; g is the slot's
    magnitude over the norm of W + s B A, one per output.
    y: (T, d_out)   gains: (N, d_out) float32   bias: (d_out,) or None for 0
    """
    for start, end, slot in _segments(batch):
        b = 0.0 if bias is None else _wide(bias)
        y[start:end] = (_wide(gains[slot]) * (_wide(y[start:end]) - b) + b).to(y.dtype)
    return y
