"""Adapters made resident in the slot pools: a refused adapter leaves nothing behind."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_peft_adapter, tiny_hf_model
from parity import cotune_logits
from safetensors.torch import load_file, save_file

from cotune.adapters.peft_format import AdapterError
from cotune.adapters.residency import ResidentAdapters
from cotune.model.loading import load_model


@pytest.fixture
def base(tmp_path):
    hf_model = tiny_hf_model("llama2")
    hf_model.save_pretrained(tmp_path / "base")
    return hf_model, load_model(tmp_path / "base")


def _adapter(hf_model, path, r=8, targets=("q_proj", "v_proj"), seed=0):
    make_peft_adapter(hf_model, path, r=r, alpha=16, targets=list(targets), seed=seed)
    return path


def _pool_snapshot(resident):
    return {name: (m.a_pool.clone(), m.b_pool.clone(), m.scales.clone(), m.slot_ranks.clone())
            for name, m in resident.modules.items()}


def _assert_same_pools(resident, snapshot):
    for name, (a, b, scales, ranks) in snapshot.items():
        m = resident.modules[name]
        assert torch.equal(m.a_pool, a) and torch.equal(m.b_pool, b), name
        assert torch.equal(m.scales, scales) and torch.equal(m.slot_ranks, ranks), name


def _poison_with_nan(path):
    weights = load_file(path / "adapter_model.safetensors")
    key = sorted(weights)[-1]
    weights[key][0, 0] = float("nan")
    save_file(weights, path / "adapter_model.safetensors")


@pytest.mark.parametrize("defect", ["nan", "rank", "pickle", "unknown-module"])
def test_refused_adapter_leaves_pools_and_slots_untouched(base, tmp_path, defect):
    hf_model, model = base
    resident = ResidentAdapters(model, num_slots=3, max_rank=16)
    good_slot = resident.load("good", _adapter(hf_model, tmp_path / "good"))
    bad = _adapter(hf_model, tmp_path / "bad", r=32 if defect == "rank" else 8, seed=1)
    if defect == "nan":
        _poison_with_nan(bad)
    elif defect == "pickle":
        (bad / "adapter_model.safetensors").unlink()
        (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    elif defect == "unknown-module":
        config = json.loads((bad / "adapter_config.json").read_text())
        config["target_modules"] = ["q_proj", "c_attn"]
        (bad / "adapter_config.json").write_text(json.dumps(config))
    snapshot = _pool_snapshot(resident)
    with pytest.raises(AdapterError):
        resident.load("bad", bad)
    _assert_same_pools(resident, snapshot)
    assert resident.slot_of("bad") is None and resident.slot_of("good") == good_slot
    # The slot the bad adapter would have taken is still free for the next one.
    assert resident.load("next", _adapter(hf_model, tmp_path / "next", seed=2)) == good_slot + 1


def test_pool_full_of_pinned_adapters_refuses_with_a_clear_message(base, tmp_path):
    hf_model, model = base
    resident = ResidentAdapters(model, num_slots=1, max_rank=16)
    resident.acquire("first", _adapter(hf_model, tmp_path / "first"))
    with pytest.raises(AdapterError, match="no free adapter slot .* in use"):
        resident.load("second", _adapter(hf_model, tmp_path / "second", seed=1))
    assert resident.slot_of("first") == 0


def test_full_pool_evicts_the_least_recently_used_unpinned_adapter(base, tmp_path):
    hf_model, model = base
    resident = ResidentAdapters(model, num_slots=2, max_rank=16)
    paths = [_adapter(hf_model, tmp_path / f"a{i}", seed=i) for i in range(4)]
    resident.load("a0", paths[0])
    resident.acquire("a1", paths[1])
    resident.load("a0", paths[0])  # a0 used more recently than a1, but a1 is pinned
    resident.load("a2", paths[2])
    assert resident.slot_of("a0") is None and resident.slot_of("a1") is not None
    resident.release("a1")
    resident.load("a3", paths[3])  # now a1 is the least recently used and unpinned
    assert resident.slot_of("a1") is None and resident.slot_of("a2") is not None


def test_a_retired_adapter_leaves_its_slot_once_its_last_request_releases_it(base, tmp_path):
    hf_model, model = base
    resident = ResidentAdapters(model, num_slots=2, max_rank=16)
    paths = [_adapter(hf_model, tmp_path / f"a{i}", seed=i) for i in range(2)]
    resident.load("idle", paths[0])
    resident.retire("idle")  # unpinned: freed at once
    assert resident.slot_of("idle") is None and resident.num_resident == 0
    resident.acquire("busy", paths[1])
    resident.acquire("busy", paths[1])
    resident.retire("busy")
    resident.release("busy")
    assert resident.slot_of("busy") is not None  # one request still samples from it
    resident.release("busy")
    assert resident.slot_of("busy") is None and resident.num_resident == 0
    resident.retire("never-resident")  # nothing to let go of


def test_loading_the_same_key_twice_reuses_its_slot(base, tmp_path):
    hf_model, model = base
    resident = ResidentAdapters(model, num_slots=2, max_rank=16)
    path = _adapter(hf_model, tmp_path / "a")
    assert resident.load("a", path) == resident.load("a", path)


def test_evicted_slot_serves_the_base_output_and_is_reused(base, tmp_path, seed):
    hf_model, model = base
    resident = ResidentAdapters(model, num_slots=1, max_rank=16)
    slot = resident.load("a", _adapter(hf_model, tmp_path / "a"))
    seq = torch.randint(0, model.config.vocab_size, (random.Random(seed).randint(2, 9),))
    with_adapter = cotune_logits(model, [seq], [slot])
    resident.evict("a")
    assert torch.equal(cotune_logits(model, [seq], [slot]), cotune_logits(model, [seq], [None]))
    assert not torch.equal(with_adapter, cotune_logits(model, [seq], [None]))
    assert resident.load("b", _adapter(hf_model, tmp_path / "b", seed=3)) == slot


def test_a_slot_taken_over_by_a_smaller_adapter_serves_that_adapter_alone(base, tmp_path, seed):
    """The slot's last adapter (rank 16 on q and v) leaves nothing behind for the next one
    (rank 4 on q only): zeros in its v pools and past rank 4 in q (what the fused LoRA ops of
    q, k and v would read beside a neighbour's v), and the same logits as those two adapters
    in a fresh pool."""
    hf_model, model = base
    other = _adapter(hf_model, tmp_path / "other", seed=2)
    q_only = _adapter(hf_model, tmp_path / "q", r=4, targets=("q_proj",), seed=1)
    resident = ResidentAdapters(model, num_slots=2, max_rank=16)
    resident.acquire("other", other)
    resident.load("qv", _adapter(hf_model, tmp_path / "qv", r=16))
    slots = [resident.load("q", q_only), resident.slot_of("other")]
    assert resident.slot_of("qv") is None
    for name, module in resident.modules.items():
        rank = 4 if name.endswith("q_proj") else 0
        assert not module.a_pool[slots[0], rank:].any(), name
        assert not module.b_pool[slots[0], :, rank:].any(), name
    fresh_model = load_model(tmp_path / "base")
    fresh = ResidentAdapters(fresh_model, num_slots=2, max_rank=16)
    fresh_slots = [fresh.load("q", q_only), fresh.load("other", other)]
    rng = random.Random(seed)
    seqs = [torch.randint(0, model.config.vocab_size, (rng.randint(2, 9),)) for _ in range(2)]
    assert torch.equal(cotune_logits(model, seqs, slots),
                       cotune_logits(fresh_model, seqs, fresh_slots))


def test_adapter_for_a_module_without_a_pool_is_refused(base, tmp_path):
    hf_model, model = base
    resident = ResidentAdapters(model, num_slots=1, max_rank=16, targets=("q_proj",))
    with pytest.raises(AdapterError, match="v_proj"):
        resident.load("qv", _adapter(hf_model, tmp_path / "qv", targets=("q_proj", "v_proj")))
    assert resident.slot_of("qv") is None
