"""The attention keys and values one sequence has seen so far (contiguous per layer)."""

from __future__ import annotations

import torch


class SequenceKV:
    """Per layer, keys and values of shape (num_kv_heads, length, head_dim)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[1]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Adds the new tokens' k, v (kv_heads, n, head_dim); returns all of them so far."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v
