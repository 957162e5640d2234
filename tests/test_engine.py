"""Continuous batching on the paged KV cache: the same greedy tokens whatever the batch, the
chunking or the preemptions."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_hf_model
from engine_helpers import run_to_completion
from peft_reference import save_random_adapters

from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.sampling import SamplingParams
from cotune.model.loading import load_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base, four adapter directories, and twelve prompts of odd lengths."""
    tmp = tmp_path_factory.mktemp("engine")
    hf_model = tiny_hf_model("llama2")
    hf_model.save_pretrained(tmp / "base")
    rng = random.Random(5)
    dirs = save_random_adapters(hf_model, tmp, 4, rng)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (rng.choice([1, 3, 9, 17, 30]),),
                             generator=generator).tolist() for _ in range(12)]
    adapters = [None, 0, 1, 2, 3, 1, None, 0, 3, 2, 2, 1]
    return tmp / "base", dirs, prompts, adapters


def _engine(base_dir, **config) -> Engine:
    return Engine(load_model(base_dir), config=EngineConfig(**{"num_slots": 4, **config}))


def _run(engine, dirs, prompts, adapters, max_tokens=20):
    seqs = [engine.add(p, SamplingParams(max_tokens=max_tokens),
                       None if a is None else (str(dirs[a]), dirs[a]))
            for p, a in zip(prompts, adapters)]
    run_to_completion(engine)
    return [s.output_ids for s in seqs]


@pytest.fixture(scope="module")
def alone(setup):
    """Each request on an engine of its own: the reference."""
    base_dir, dirs, prompts, adapters = setup
    return [_run(_engine(base_dir), dirs, [p], [a])[0] for p, a in zip(prompts, adapters)]


def test_batched_greedy_tokens_equal_each_request_alone(setup, alone):
    base_dir, dirs, prompts, adapters = setup
    assert _run(_engine(base_dir), dirs, prompts, adapters) == alone


def test_chunked_prefill_gives_the_same_tokens(setup, alone):
    base_dir, dirs, prompts, adapters = setup
    engine = _engine(base_dir, max_batched_tokens=7)  # prompts of 9..30 tokens are chunked
    assert _run(engine, dirs, prompts, adapters) == alone
    assert engine.scheduler.counters["steps"] > 20


def test_preemption_recomputes_and_gives_the_same_tokens(setup, alone):
    base_dir, dirs, prompts, adapters = setup
    # 64 cache rows for 12 requests of up to 50 tokens: running sequences must be preempted.
    engine = _engine(base_dir, kv_cache_tokens=64, block_size=4)
    assert _run(engine, dirs, prompts, adapters) == alone
    assert engine.scheduler.counters["preemptions"] > 0
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_finished_requests_return_their_blocks_and_adapter_pins(setup):
    base_dir, dirs, prompts, adapters = setup
    engine = _engine(base_dir)
    _run(engine, dirs, prompts, adapters, max_tokens=3)
    assert engine.cache.free_blocks == engine.cache.num_blocks
    assert not engine.adapters._pins


def test_abort_frees_blocks_and_stops_the_request(setup):
    base_dir, dirs, prompts, _ = setup
    engine = _engine(base_dir)
    keep = engine.add(prompts[0], SamplingParams(max_tokens=8))
    drop = engine.add(prompts[4], SamplingParams(max_tokens=8), (str(dirs[0]), dirs[0]))
    engine.step()
    engine.abort(drop)
    run_to_completion(engine)
    assert drop.finish_reason == "abort" and len(drop.output_ids) <= 1
    assert keep.finish_reason == "length" and len(keep.output_ids) == 8
    assert engine.cache.free_blocks == engine.cache.num_blocks and not engine.adapters._pins


def test_request_larger_than_the_whole_cache_is_refused_up_front(setup):
    base_dir, dirs, prompts, _ = setup
    engine = _engine(base_dir, kv_cache_tokens=32, block_size=8)
    with pytest.raises(ValueError, match="whole cache holds 32"):
        engine.add(prompts[4], SamplingParams(max_tokens=40), (str(dirs[1]), dirs[1]))
    assert not engine.has_work and not engine.adapters._pins


def test_stop_token_ends_the_request_and_is_kept(setup, alone):
    base_dir, dirs, prompts, adapters = setup
    reference = alone[3]
    stop = reference[4]
    engine = _engine(base_dir)
    seq = engine.add(prompts[3], SamplingParams(max_tokens=20, stop_token_ids=(stop,)),
                     (str(dirs[adapters[3]]), dirs[adapters[3]]))
    run_to_completion(engine)
    assert seq.output_ids == reference[: reference.index(stop) + 1]
    assert seq.finish_reason == "stop"
