"""What the model asks of a KV cache during one forward pass (the engine's paged cache
provides it)."""

from __future__ import annotations

from typing import Protocol

import torch


class CachedAttention(Protocol):
    past_lengths: list[int]  # per sequence, tokens already cached before this pass

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None) -> torch.Tensor:
        """Caches this pass's k, v (T, kv_heads, D) of `layer` and returns every sequence's
        causal attention output (T, heads, D), rows in batch order."""
