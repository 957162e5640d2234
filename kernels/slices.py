"""Several projections of one layer that read the same input (q, k and v; gate and up) as
slices of one op: written here once as a loop over any implementation's single ops, for the
implementations that do not fuse them (Triton launches them together)."""

from __future__ import annotations

import torch


def shrink_each(shrink, x, weights, batch) -> torch.Tensor:
    """h[:, j*R:(j+1)*R] = shrink(x, weights[j], batch) for every slice j: (T, J*R)."""
    return torch.cat([shrink(x, w, batch) for w in weights], dim=1)


def expand_each(expand, y, h, weights, offsets, batch, scales) -> torch.Tensor:
    """y[:, o_j:o_j+d_j] += expand of h[:, j*R:(j+1)*R] through weights[j] (N, d_j, R) with
    scales[j], for every slice j (in place, through a view of y's columns)."""
    rank = weights[0].shape[2]
    for j, (w, offset, s) in enumerate(zip(weights, offsets, scales)):
        expand(y[:, offset:offset + w.shape[1]], h[:, j * rank:(j + 1) * rank], w, batch, s)
    return y
