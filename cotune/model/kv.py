"""What attention needs of a sequence's cached keys and values (the engine's paged cache
provides it)."""

from __future__ import annotations

from typing import Protocol

import torch


class KVView(Protocol):
    length: int  # tokens already cached, fixed for the whole forward pass

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Caches this pass's k, v (kv_heads, n, head_dim) of `layer`; returns all of them,
        each (kv_heads, length + n, head_dim)."""
