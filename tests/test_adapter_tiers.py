"""Adapters in three tiers (device slots, host memory, disk): the host LRU by bytes, hot
adapters kept through a scan, slots taken at admission, loads prefetched from the queue, and
more distinct adapters than slots served exactly as each alone."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from conftest import make_peft_adapter, tiny_hf_model
from engine_helpers import run_to_completion
from safetensors.torch import load_file

import cotune.adapters.host_cache as host_cache_module
from cotune import Request, Runtime
from cotune.adapters.host_cache import HostCache
from cotune.adapters.peft_format import AdapterError, load_peft_adapter
from cotune.adapters.residency import ResidentAdapters
from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.sampling import SamplingParams
from cotune.engine.sequence import SeqState
from cotune.model.loading import load_model

NUM_ADAPTERS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base and 12 real PEFT adapters of assorted ranks and targets."""
    tmp = tmp_path_factory.mktemp("tiers")
    hf_model = tiny_hf_model("llama2")
    hf_model.save_pretrained(tmp / "base")
    rng = random.Random(11)
    dirs = []
    for i in range(NUM_ADAPTERS):
        targets = rng.sample(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], 2)
        make_peft_adapter(hf_model, tmp / f"a{i}", r=rng.choice([2, 4, 8]), alpha=8,
                          targets=targets, seed=100 + i)
        dirs.append(tmp / f"a{i}")
    return tmp / "base", dirs


def _engine(base_dir, **config) -> Engine:
    return Engine(load_model(base_dir), config=EngineConfig(**config))


def _file_bytes(path) -> int:
    """An adapter's size in memory, from its safetensors file (float32 A and B)."""
    return sum(t.numel() * 4 for t in load_file(path / "adapter_model.safetensors").values())


def _add(engine, prompt, path, max_tokens=8):
    adapter = None if path is None else (path.name, path)
    return engine.add(prompt, SamplingParams(max_tokens=max_tokens), adapter)


def test_host_cache_is_bounded_in_bytes_and_drops_the_least_recently_used(setup):
    base_dir, dirs = setup
    base_modules = ResidentAdapters(load_model(base_dir), 1, 8).base_modules
    sizes = [_file_bytes(d) for d in dirs[:3]]
    cache = HostCache(base_modules, 8, capacity_bytes=sizes[0] + max(sizes[1:]) + 1)
    for key in ("a0", "a1", "a0"):  # a0 used last
        cache.fetch(key, dirs[int(key[1])]).result()
    assert cache.loads == 2  # the second a0 came from host memory, not disk
    assert cache.size_bytes == sizes[0] + sizes[1]
    cache.fetch("a2", dirs[2]).result()
    assert "a1" not in cache and "a0" in cache and "a2" in cache
    assert cache.size_bytes == sizes[0] + sizes[2] and cache.num_adapters == 2
    assert cache.evictions == 1


def test_device_slots_evict_the_least_recently_used_first(setup):
    base_dir, dirs = setup
    resident = ResidentAdapters(load_model(base_dir), num_slots=3, max_rank=8, hot_share=0)
    for i in (0, 1, 2, 0, 3):  # a1 is then the least recently used: it goes for a3
        resident.load(f"a{i}", dirs[i])
    assert resident.slot_of("a1") is None
    assert all(resident.slot_of(f"a{i}") is not None for i in (0, 2, 3))
    resident.load("a4", dirs[4])  # then a2
    assert resident.slot_of("a2") is None and resident.slot_of("a0") is not None


@pytest.mark.parametrize("hot_share", [0.5, 0.0])
def test_hot_adapters_keep_their_slots_through_a_scan_of_cold_ones(setup, hot_share):
    base_dir, dirs = setup
    resident = ResidentAdapters(load_model(base_dir), num_slots=4, max_rank=8,
                                hot_share=hot_share)
    for _ in range(3):
        for key in ("a0", "a1"):
            resident.acquire(key, dirs[int(key[1])])
            resident.release(key)
    for i in range(2, NUM_ADAPTERS):  # a scan: each cold adapter once
        resident.acquire(f"a{i}", dirs[i])
        resident.release(f"a{i}")
    kept = {key for key in ("a0", "a1") if resident.slot_of(key) is not None}
    # Without a hot share the scan evicts them: the test can tell.
    assert kept == ({"a0", "a1"} if hot_share else set())
    assert resident.num_resident == 4


def test_a_queued_request_holds_no_slot(setup):
    base_dir, dirs = setup
    engine = _engine(base_dir, num_slots=2)
    seqs = [_add(engine, [1, 2, 3], d, max_tokens=4) for d in dirs[:3]]
    for seq in seqs:
        seq.adapter_load.result()
    assert engine.adapters.num_resident == 0 and all(s.slot is None for s in seqs)
    engine.step()
    running = [s for s in seqs if s.state is SeqState.RUNNING]
    assert len(running) == 2 and sorted(s.slot for s in running) == [0, 1]
    assert seqs[2].state is SeqState.WAITING and seqs[2].slot is None
    run_to_completion(engine)
    assert all(s.finish_reason == "length" and s.slot is None for s in seqs)


def test_three_times_more_adapters_than_slots_in_one_burst_equal_each_alone(setup, seed):
    base_dir, dirs = setup
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 320, (random.Random(seed + i).randint(1, 20),),
                             generator=generator).tolist() for i in range(NUM_ADAPTERS + 2)]
    paths = [*dirs, None, dirs[0]]  # 12 distinct adapters over 4 slots, the base, a repeat
    alone = []
    for prompt, path in zip(prompts, paths):
        engine = _engine(base_dir, num_slots=4)
        seq = _add(engine, prompt, path)
        run_to_completion(engine)
        alone.append(seq.output_ids)
    engine = _engine(base_dir, num_slots=4)
    placed = []
    engine.adapters.on_load = placed.append
    seqs = [_add(engine, prompt, path) for prompt, path in zip(prompts, paths)]
    run_to_completion(engine)
    assert [s.output_ids for s in seqs] == alone
    assert all(s.finish_reason == "length" for s in seqs)
    assert len(placed) >= NUM_ADAPTERS and engine.adapters.num_resident == 4


def test_a_queued_request_is_loaded_from_disk_before_its_admission(setup):
    base_dir, dirs = setup
    engine = _engine(base_dir, num_slots=1)
    events = []
    engine.adapters.host.on_load = lambda s: events.append(
        ("disk->host", threading.current_thread().name))
    engine.adapters.on_load = lambda s: events.append(("host->device", None))
    first = _add(engine, [1, 2], dirs[0], max_tokens=6)
    first.adapter_load.result()
    engine.step()  # `first` takes the only slot
    second = _add(engine, [3, 4], dirs[1], max_tokens=2)
    second.adapter_load.result()  # its load ran while it was queued behind `first`
    assert second.state is SeqState.WAITING and second.slot is None
    assert [e for e, _ in events] == ["disk->host", "host->device", "disk->host"]
    assert all(thread.startswith("adapter-load") for e, thread in events if e == "disk->host")
    run_to_completion(engine)
    assert [e for e, _ in events][3:] == ["host->device"]  # admission read no file
    assert engine.adapters.host.loads == 2 and second.finish_reason == "length"


def test_a_request_whose_adapter_is_loading_lets_ready_ones_pass(setup, monkeypatch):
    base_dir, dirs = setup
    gate = threading.Event()

    def held_load(path, *args):  # the real load, once the test lets it through
        if path == dirs[1]:
            assert gate.wait(60), "the test never opened the gate"
        return load_peft_adapter(path, *args)

    monkeypatch.setattr(host_cache_module, "load_peft_adapter", held_load)
    engine = _engine(base_dir, num_slots=2)
    slow = _add(engine, [1, 2, 3], dirs[1], max_tokens=3)
    ready = _add(engine, [4, 5], None, max_tokens=3)
    for _ in range(3):
        engine.step()
    assert ready.finish_reason == "length" and slow.state is SeqState.WAITING
    gate.set()
    run_to_completion(engine)
    assert slow.finish_reason == "length"


def test_a_request_refused_a_slot_is_not_starved_by_arrivals_on_resident_adapters(setup):
    base_dir, dirs = setup
    engine = _engine(base_dir, num_slots=1)
    busy = [_add(engine, [1, 2], dirs[0], max_tokens=4)]
    busy[0].adapter_load.result()
    engine.step()
    starved = _add(engine, [3], dirs[1], max_tokens=2)
    starved.adapter_load.result()
    for _ in range(60):  # a new request on the resident adapter at every step
        busy.append(_add(engine, [1, 2], dirs[0], max_tokens=4))
        engine.step()
        if starved.is_finished:
            break
    assert starved.finish_reason == "length", "the request refused a slot never ran"
    assert engine.scheduler.config.max_slot_waits < 60


def test_a_bad_adapter_file_fails_its_request_alone_with_the_loaders_message(setup, tmp_path):
    base_dir, dirs = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    engine = _engine(base_dir, num_slots=2)
    good = [_add(engine, [1, 2, 3], d) for d in dirs[:2]]
    failed = _add(engine, [1, 2, 3], bad)
    run_to_completion(engine)
    assert failed.finish_reason == "error" and failed.output_ids == []
    with pytest.raises(AdapterError) as direct:
        load_peft_adapter(bad, engine.adapters.base_modules, 64)
    assert str(failed.adapter_load.exception()) == str(direct.value)
    assert "invalid adapter_config.json" in str(direct.value)
    for seq, path in zip(good, dirs):
        alone = _engine(base_dir, num_slots=2)
        reference = _add(alone, [1, 2, 3], path)
        run_to_completion(alone)
        assert seq.output_ids == reference.output_ids and seq.finish_reason == "length"


def test_runtime_raises_a_bad_adapters_error_to_its_caller_and_serves_the_next(
        tiny_checkpoint, setup, tmp_path):
    _, checkpoint = tiny_checkpoint
    _, dirs = setup
    bad = tmp_path / "bad"
    make_peft_adapter(tiny_hf_model("llama2"), bad, r=4, alpha=8, targets=["q_proj"])
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with Runtime.load(checkpoint, num_slots=2) as rt:
        with pytest.raises(AdapterError, match="adapter_model.safetensors"):
            rt.generate([Request(prompt_token_ids=[1, 2], adapter=str(bad), max_tokens=4),
                         Request(prompt_token_ids=[3], adapter=str(dirs[0]), max_tokens=4)])
        with pytest.raises(AdapterError, match="adapter_model.safetensors"):
            list(rt.stream(Request(prompt_token_ids=[1, 2], adapter=str(bad), max_tokens=4)))
        done = rt.generate([Request(prompt_token_ids=[3], adapter=str(dirs[0]), max_tokens=4)])
        assert done[0].finish_reason == "length" and rt.error is None
