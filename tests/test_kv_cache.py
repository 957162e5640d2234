"""The paged KV cache: block accounting and the rows each position lands in."""

from __future__ import annotations

import pytest
import torch

from cotune.engine.kv_cache import PagedKVCache
from cotune.model.config import ModelConfig

CONFIG = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=4)


def test_reserve_takes_only_the_blocks_new_tokens_need():
    cache = PagedKVCache(CONFIG, num_blocks=5, block_size=4)
    assert cache.reserve("a", 5) and len(cache.tables["a"]) == 2
    cache.commit("a", 5)
    assert cache.blocks_needed("a", 3) == 0  # rows 5..7 fit in the second block
    assert cache.reserve("a", 4) and len(cache.tables["a"]) == 3
    assert cache.free_blocks == 2


def test_failed_reserve_takes_nothing():
    cache = PagedKVCache(CONFIG, num_blocks=2, block_size=4)
    assert cache.reserve("a", 4)
    assert not cache.reserve("b", 5)
    assert cache.free_blocks == 1 and "b" not in cache.tables


def test_free_returns_every_block():
    cache = PagedKVCache(CONFIG, num_blocks=3, block_size=2)
    cache.reserve("a", 3)
    cache.reserve("b", 2)
    cache.free("a")
    assert cache.free_blocks == 2 and "a" not in cache.tables
    assert cache.reserve("c", 4) and sorted(cache.tables["c"] + cache.tables["b"]) == [0, 1, 2]


def test_view_returns_every_token_in_order_across_scattered_blocks():
    cache = PagedKVCache(CONFIG, num_blocks=6, block_size=2)
    cache.reserve("other", 3)  # interleave blocks of two sequences
    written_k, written_v = [], []
    for step, n in enumerate([3, 1, 2, 1]):
        assert cache.reserve("a", n)
        cache.reserve("other", 1)
        cache.commit("other", 0)
        view = cache.view("a")
        k = torch.randn(CONFIG.num_kv_heads, n, CONFIG.head_dim)
        v = torch.randn(CONFIG.num_kv_heads, n, CONFIG.head_dim)
        for layer in range(CONFIG.num_layers):
            keys, values = view.append(layer, k + layer, v - layer)
        cache.commit("a", n)
        written_k.append(k + (CONFIG.num_layers - 1))
        written_v.append(v - (CONFIG.num_layers - 1))
        assert torch.equal(keys, torch.cat(written_k, dim=1)), step
        assert torch.equal(values, torch.cat(written_v, dim=1)), step
    assert cache.lengths["a"] == 7


def test_cache_refuses_nonsense_sizes():
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        PagedKVCache(CONFIG, num_blocks=0)
