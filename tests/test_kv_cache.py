"""The paged KV cache: block accounting and the rows each position lands in."""

from __future__ import annotations

import pytest
import torch

from cotune.engine.kv_cache import PagedBatch, PagedKVCache
from cotune.model.attention import attend_one
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


def test_paged_attention_equals_attention_over_contiguous_keys(seed):
    """Three sequences step by step (prefill chunks, then decodes side by side) next to an
    uncached one: the paged batch gives what attention over contiguous tensors gives."""
    config = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=4, sliding_window=6)
    cache = PagedKVCache(config, num_blocks=20, block_size=3)
    history = {sid: ([], []) for sid in "abc"}  # all keys, values so far (layer 1)
    for step, lens in enumerate([{"a": 5, "b": 2}, {"a": 1, "b": 4, "c": 7}, {"a": 1, "b": 1,
                                                                          "c": 1}] * 2):
        seq_ids = [*lens, None]
        seq_lens = [*lens.values(), 3]  # the uncached sequence: 3 training rows
        for sid, n in lens.items():
            assert cache.reserve(sid, n)
        batch = PagedBatch(cache, seq_ids, seq_lens)
        total = sum(seq_lens)
        q = torch.randn(total, 4, 4)
        k, v = torch.randn(total, 2, 4), torch.randn(total, 2, 4)
        for layer in range(2):
            out = batch.attention(layer, q, k, v, config.sliding_window)
        start = 0
        for sid, n in zip(seq_ids, seq_lens):
            keys, values = k[start:start + n], v[start:start + n]
            if sid is not None:
                history[sid][0].append(keys)
                history[sid][1].append(values)
                keys, values = torch.cat(history[sid][0]), torch.cat(history[sid][1])
            want = attend_one(q[start:start + n].transpose(0, 1), keys.transpose(0, 1),
                              values.transpose(0, 1), config.sliding_window).transpose(0, 1)
            torch.testing.assert_close(out[start:start + n], want,
                                       msg=lambda m, s=sid, i=step: f"step {i}, seq {s}: {m}")
            start += n
        for sid, n in lens.items():
            cache.commit(sid, n)


def test_cache_refuses_nonsense_sizes():
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        PagedKVCache(CONFIG, num_blocks=0)


def test_a_sequences_non_finite_values_never_reach_another_sequences_attention():
    """Decodes of unequal lengths attend in one padded call: the padding of the shorter must
    read nothing any sequence wrote (a NaN there, masked out, still makes NaN)."""
    cache = PagedKVCache(CONFIG, num_blocks=8, block_size=2)
    for sid, n in (("hostile", 2), ("long", 5), ("short", 1)):
        assert cache.reserve(sid, n)
        cache.commit(sid, n)
    assert cache.tables["hostile"] == [0]  # rows 0 and 1
    for layer in range(CONFIG.num_layers):
        cache.keys[layer][:2] = torch.nan
        cache.values[layer][:2] = torch.nan
    for sid in ("long", "short"):
        assert cache.reserve(sid, 1)
    batch = PagedBatch(cache, ["long", "short"], [1, 1])
    q, k, v = torch.randn(2, 2, 4), torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    assert torch.isfinite(batch.attention(0, q, k, v, None)).all()
