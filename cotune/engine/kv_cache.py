"""The paged KV cache: fixed-size blocks shared by all sequences, a block table per sequence.

Per layer, keys and values live in one tensor each of shape
(num_blocks * block_size, num_kv_heads, head_dim); the token at position p of a sequence sits
in row table[p // block_size] * block_size + p % block_size. A sequence holds only the blocks
its tokens fill, so memory follows the tokens actually cached, not a maximum length.
"""

from __future__ import annotations

import torch

from cotune.model.config import ModelConfig


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.block_size, self.num_blocks = block_size, num_blocks
        rows = num_blocks * block_size
        shape = (rows, config.num_kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device)
                     for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device)
                       for _ in range(config.num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() takes block 0 first
        self.tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """Key and value bytes one token takes over all layers."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq_id, new_tokens: int) -> int:
        """Blocks a sequence must add to hold `new_tokens` more tokens."""
        total = self.lengths.get(seq_id, 0) + new_tokens
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-total // self.block_size) - have)

    def reserve(self, seq_id, new_tokens: int) -> bool:
        """Makes room for `new_tokens` more tokens of `seq_id`; False (and nothing taken) when
        the free blocks do not suffice."""
        need = self.blocks_needed(seq_id, new_tokens)
        if need > len(self._free):
            return False
        table = self.tables.setdefault(seq_id, [])
        self.lengths.setdefault(seq_id, 0)
        table.extend(self._free.pop() for _ in range(need))
        return True

    def free(self, seq_id) -> None:
        """Returns every block of `seq_id` to the pool."""
        self._free.extend(reversed(self.tables.pop(seq_id, [])))
        self.lengths.pop(seq_id, None)

    def view(self, seq_id) -> SequenceView:
        """The model-facing handle of one sequence for one forward pass."""
        return SequenceView(self, seq_id)

    def commit(self, seq_id, new_tokens: int) -> None:
        """Records that a forward pass wrote `new_tokens` more tokens of `seq_id`."""
        self.lengths[seq_id] += new_tokens

    def _rows(self, seq_id, start: int, end: int) -> torch.Tensor:
        """(end - start,) cache rows of positions start..end-1 of `seq_id`."""
        positions = torch.arange(start, end)
        table = torch.tensor(self.tables[seq_id])
        rows = table[positions // self.block_size] * self.block_size + positions % self.block_size
        return rows.to(self.keys[0].device)


class SequenceView:
    """What the attention of one sequence sees during one forward pass: `length` tokens already
    cached; `append` writes this pass's keys and values and returns all of them."""

    def __init__(self, cache: PagedKVCache, seq_id):
        self.cache, self.seq_id = cache, seq_id
        self.length = cache.lengths.get(seq_id, 0)
        self._rows: torch.Tensor | None = None

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: (kv_heads, n, head_dim) of the new tokens -> all keys and values so far,
        each (kv_heads, length + n, head_dim). The cache holds no autograd state: cached rows
        are served rows, and training rows never go through the cache."""
        n = k.shape[1]
        if self._rows is None:  # the same rows for every layer of this pass
            self._rows = self.cache._rows(self.seq_id, 0, self.length + n)
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        new_rows = self._rows[self.length:]
        keys[new_rows] = k.detach().transpose(0, 1).to(keys.dtype)
        values[new_rows] = v.detach().transpose(0, 1).to(values.dtype)
        return keys[self._rows].transpose(0, 1), values[self._rows].transpose(0, 1)
