"""Segmented LoRA ops in batched torch: the fast implementation where Triton is not used
(the CPU). Same signatures and semantics as `sgmv_reference`; segments are padded to the
longest one so that each op is one batched matmul, whatever the number of adapters."""

from __future__ import annotations

import torch

_last_padded: tuple = (None, None, None)


def _padded(seg_starts: torch.Tensor, seg_slots: torch.Tensor, device):
    """(rows (S, L), valid (S, L), slots (S,)) of the segments that have an adapter: rows
    holds each segment's row indices, padded with row 0 where `valid` is False.

    Every projection of a step passes the same two tensors, so the last answer is kept and
    reused while they are the very same objects (segment tensors are never modified)."""
    global _last_padded
    if _last_padded[0] is seg_starts and _last_padded[1] is seg_slots:
        return _last_padded[2]
    result = _pad(seg_starts, seg_slots, device)
    _last_padded = (seg_starts, seg_slots, result)
    return result


def _pad(seg_starts: torch.Tensor, seg_slots: torch.Tensor, device):
    starts, lengths = seg_starts[:-1], seg_starts[1:] - seg_starts[:-1]
    keep = (seg_slots >= 0) & (lengths > 0)
    starts, lengths, slots = starts[keep], lengths[keep], seg_slots[keep]
    if not slots.numel():
        return None
    offsets = torch.arange(int(lengths.max()))
    valid = (offsets[None, :] < lengths[:, None]).reshape(-1)  # (S * L,)
    rows = (starts[:, None] + offsets[None, :]).reshape(-1)  # (S * L,)
    picked = valid.nonzero()[:, 0]  # which padded rows are real
    return (torch.where(valid, rows, 0).to(device), picked.to(device), rows[valid].to(device),
            slots.to(device), len(slots))


def _scaled(out: torch.Tensor, scales, slots) -> torch.Tensor:
    """out (S, L, n) times each segment's scale."""
    return out if scales is None else out * scales[slots].to(out.dtype)[:, None, None]


def _segment_products(src, weights, padded, scales):
    """Each segment's rows of src (T, k) times its adapter's W.T, scaled: ((K, n) for the K
    rows that have an adapter, in order; their row indices (K,))."""
    rows, picked, targets, slots, num = padded
    xs = src.index_select(0, rows).view(num, -1, src.shape[1])  # (S, L, k)
    out = torch.bmm(xs, weights.index_select(0, slots).transpose(1, 2).to(src.dtype))
    out = _scaled(out, scales, slots)  # (S, L, n)
    return out.reshape(-1, out.shape[2]).index_select(0, picked), targets


def sgmv_shrink(x, weights, seg_starts, seg_slots, scales=None):
    """Semantics: h[s[i]:s[i+1]] = scale[slot[i]] * x[s[i]:s[i+1]] @ W[slot[i]].T"""
    h = torch.zeros(x.shape[0], weights.shape[1], dtype=x.dtype, device=x.device)
    padded = _padded(seg_starts, seg_slots, x.device)
    if padded is not None:
        products, targets = _segment_products(x, weights, padded, scales)
        h[targets] = products
    return h


def sgmv_expand(y, h, weights, seg_starts, seg_slots, scales=None):
    """Semantics: y[s[i]:s[i+1]] += scale[slot[i]] * h[s[i]:s[i+1]] @ W[slot[i]].T (in place)"""
    padded = _padded(seg_starts, seg_slots, y.device)
    if padded is not None:
        products, targets = _segment_products(h, weights, padded, scales)
        y.index_add_(0, targets, products.to(y.dtype))
    return y


def sgmv_weight_grad(grad_out, inputs, seg_starts, seg_slots, num_slots, scales=None):
    """Semantics: dW[slot] = sum over segments i of that slot of
                             scale[slot] * grad_out[s[i]:s[i+1]].T @ inputs[s[i]:s[i+1]]"""
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    grad = torch.zeros(num_slots, grad_out.shape[1], inputs.shape[1], dtype=dtype,
                       device=inputs.device)
    padded = _padded(seg_starts, seg_slots, inputs.device)
    if padded is None:
        return grad
    rows, picked, _, slots, num = padded
    keep = torch.zeros(rows.shape[0], 1, dtype=dtype, device=inputs.device)
    keep[picked] = 1.0  # padding rows contribute nothing
    g = (grad_out.index_select(0, rows).to(dtype) * keep).view(num, -1, grad_out.shape[1])
    xs = inputs.index_select(0, rows).to(dtype).view(num, -1, inputs.shape[1])
    per_segment = _scaled(torch.bmm(g.transpose(1, 2), xs), scales, slots)  # (S, d_out, d_in)
    return grad.index_add_(0, slots, per_segment)
