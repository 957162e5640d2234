"""Causal self-attention over one sequence, and over a batch of decoding sequences at once."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor:
    """One sequence: q (H, n, D) are its last n positions, k, v (Hkv, total, D) all of them.
    Query i sits at position total - n + i and sees keys up to it, within the window.
    Returns (H, n, D)."""
    n, total = q.shape[1], k.shape[1]
    if n == total and (window is None or window >= n):
        mask, causal = None, True
    else:
        q_pos = torch.arange(total - n, total, device=q.device)[:, None]
        k_pos = torch.arange(total, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        causal = False
    # 4-D (batch of one): the layout the fused CPU and GPU kernels are built for
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                          is_causal=causal, enable_gqa=True)[0]


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                  window: int | None) -> torch.Tensor:
    """B sequences with one new token each, in one call: q (B, H, D); k, v (B, L, Hkv, D)
    padded to the longest, sequence b holding lengths[b] valid keys (its own token last).
    Returns (B, H, D)."""
    k_pos = torch.arange(k.shape[1], device=q.device)[None, :]  # (1, L)
    q_pos = (lengths - 1)[:, None]  # (B, 1)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    out = F.scaled_dot_product_attention(
        q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :],
        enable_gqa=True)  # (B, H, 1, D)
    return out[:, :, 0]
