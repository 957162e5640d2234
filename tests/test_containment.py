"""One adapter's fault costs its own requests, never the engine: an adapter whose outputs
overflow, one that cannot be placed in a slot, or one whose pass fails is quarantined (its
requests fail with the reason, new ones are refused), and every other request in the same
steps completes with the tokens it gets alone."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading

import pytest
import torch
from conftest import ALL_TARGETS, make_peft_adapter
from safetensors.torch import load_file, save_file

from cotune import Request, Runtime
from cotune.adapters.peft_format import AdapterError, LoraAdapter, load_peft_adapter
from cotune.engine.containment import AdapterQuarantined, RequestFailed, non_finite_rows
from cotune.engine.runtime import EngineStopped

PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [44, 45, 46, 47], [12] * 9]


def _requests(adapter: str | None, max_tokens: int = 8) -> list[Request]:
    return [Request(prompt_token_ids=p, adapter=adapter, max_tokens=max_tokens,
                    ignore_eos=True) for p in PROMPTS]


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    """Two real PEFT adapters of the tiny base: (good's directory, bad's directory)."""
    model, _ = tiny_checkpoint
    root = tmp_path_factory.mktemp("containment")
    for seed, name in enumerate(("good", "bad")):
        make_peft_adapter(model, root / name, r=4, alpha=8, targets=ALL_TARGETS, seed=seed)
    return root / "good", root / "bad"


def _hostile(rt: Runtime, path, **changes) -> LoraAdapter:
    """The adapter at `path` as it was checked, then changed past the checks (as one stored
    before they existed would be): `changes` of every module's fields."""
    adapter = load_peft_adapter(path, rt.engine.adapters.base_modules,
                                max_rank=rt.engine.config.max_rank)
    return LoraAdapter({name: dataclasses.replace(module, **{
        field: make(module) for field, make in changes.items()})
        for name, module in adapter.modules.items()}, adapter.config)


def _serving(rt: Runtime, adapters) -> dict[str, list[list[int]]]:
    """Registers "good" and "bad"; the tokens the base model and "good" give alone."""
    good, bad = adapters
    rt.register_adapter("good", good)
    rt.register_adapter("bad", bad)
    return {name: [c.token_ids for c in rt.generate(_requests(adapter))]
            for name, adapter in (("base", None), ("good", "good"))}


def _in_threads(rt: Runtime, calls: dict[str, list[Request]]) -> dict[str, object]:
    """Runs each call's requests in a thread of its own, all at once (they share steps):
    each call's completions' tokens, or the error it raised."""
    results: dict[str, object] = {}
    barrier = threading.Barrier(len(calls))

    def run(name: str, requests: list[Request]) -> None:
        barrier.wait()
        try:
            results[name] = [c.token_ids for c in rt.generate(requests)]
        except Exception as e:  # noqa: BLE001 - the test looks at it
            results[name] = e

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.mark.parametrize("fault, changes, reason", [
    ("outputs that overflow", dict(b=lambda m: m.b * 1e30), "not finite"),
    ("a scale past float32", dict(scale=lambda m: 1e308), "could not be placed"),
])
def test_a_hostile_adapter_is_quarantined_and_every_other_request_completes(
        tiny_checkpoint, adapters, fault, changes, reason):
    _, base = tiny_checkpoint
    with Runtime.load(base) as rt:
        alone = _serving(rt, adapters)
        rt.cache_adapter("bad", _hostile(rt, adapters[1], **changes))  # its next load reads no file
        results = _in_threads(rt, {"base": _requests(None), "good": _requests("good"),
                                   "bad": _requests("bad")})
        assert isinstance(results["bad"], AdapterQuarantined), results["bad"]
        assert reason in str(results["bad"]) and "'bad' is quarantined" in str(results["bad"])
        assert results["base"] == alone["base"] and results["good"] == alone["good"]
        with pytest.raises(AdapterQuarantined, match=reason):  # refused from now on
            rt.generate(_requests("bad"))
        assert rt.running and rt.error is None
        assert [c.token_ids for c in rt.generate(_requests("good"))] == alone["good"]
        assert rt.engine.cache.free_blocks == rt.engine.cache.num_blocks  # nothing leaked


def _failing_on_slot(rt: Runtime, key: str | None) -> None:
    """Makes the model fail any pass with a row of adapter `key` (every pass when None): a
    fault inside a step's forward."""
    model = rt.engine.model
    forward = model.forward

    def failing(batch):
        slot = None if key is None else rt.engine.adapters.slot_of(key)
        if key is None or (batch.lora is not None and slot in batch.lora.seg_slots):
            raise RuntimeError("a kernel failed")
        return forward(batch)

    model.forward = failing


def test_a_pass_that_fails_on_one_adapter_fails_its_requests_alone(tiny_checkpoint, adapters):
    _, base = tiny_checkpoint
    with Runtime.load(base) as rt:
        alone = _serving(rt, adapters)
        rt.generate(_requests("bad", max_tokens=1))  # resident
        _failing_on_slot(rt, "bad")
        results = _in_threads(rt, {"base": _requests(None), "good": _requests("good"),
                                   "bad": _requests("bad")})
        assert isinstance(results["bad"], AdapterQuarantined), results["bad"]
        assert "a kernel failed" in str(results["bad"])
        assert results["base"] == alone["base"] and results["good"] == alone["good"]
        assert rt.running


def test_a_fault_of_the_base_itself_still_stops_the_engine(tiny_checkpoint):
    _, base = tiny_checkpoint
    with Runtime.load(base) as rt:
        _failing_on_slot(rt, None)
        with pytest.raises(EngineStopped, match="a kernel failed"):
            rt.generate(_requests(None))
        assert not rt.running


def test_a_base_request_whose_outputs_overflow_fails_alone(tiny_checkpoint, adapters):
    _, base = tiny_checkpoint
    good, _ = adapters
    with Runtime.load(base) as rt:
        rt.register_adapter("good", good)
        alone = [c.token_ids for c in rt.generate(_requests("good"))]
        sample = rt.engine._sample

        def overflowing(chunks, hidden):  # the base model's rows (no adapter) overflow
            hidden, row = hidden.clone(), 0
            for chunk in chunks:
                if chunk.seq.adapter is None:
                    hidden[row:row + chunk.num_tokens] = torch.inf
                row += chunk.num_tokens
            return sample(chunks, hidden)

        rt.engine._sample = overflowing
        results = _in_threads(rt, {"base": _requests(None)[:1], "good": _requests("good")})
        assert isinstance(results["base"], RequestFailed), results["base"]
        assert "not finite" in str(results["base"])
        assert results["good"] == alone
        assert [c.completion_tokens for c in rt.generate(_requests("good"))] == [8] * 4


def test_adapters_past_the_bounds_are_refused_at_load(tiny_checkpoint, adapters, tmp_path):
    _, base = tiny_checkpoint
    _, bad = adapters
    with Runtime.load(base) as rt:
        modules = rt.engine.adapters.base_modules
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    tensors = {key: tensor * (1e30 if "lora_B" in key else 1.0)
               for key, tensor in load_file(bad / "adapter_model.safetensors").items()}
    save_file(tensors, hostile / "adapter_model.safetensors")
    (hostile / "adapter_config.json").write_bytes((bad / "adapter_config.json").read_bytes())
    with pytest.raises(AdapterError, match=r"delta \(scale x lora_B @ lora_A\) with an entry of "
                                           r".*; accepted: entries of at most 1000"):
        load_peft_adapter(hostile, modules, max_rank=64)


def test_an_adapter_stored_before_the_bounds_fails_its_requests_alone(tiny_checkpoint,
                                                                     adapters, tmp_path):
    """An adapter registered before the bounds existed (lora_alpha 1e308 on disk) is checked
    again when it is read: its requests fail saying why, and the engine serves on."""
    _, base = tiny_checkpoint
    good, bad = adapters
    stored = tmp_path / "stored"
    shutil.copytree(bad, stored)
    config = json.loads((stored / "adapter_config.json").read_text())
    (stored / "adapter_config.json").write_text(json.dumps(dict(config, lora_alpha=1e308)))
    with Runtime.load(base) as rt:
        rt.register_adapter("good", good)
        rt.register_adapter("stored", stored)
        results = _in_threads(rt, {"good": _requests("good"), "stored": _requests("stored")})
        assert isinstance(results["stored"], AdapterError), results["stored"]
        assert "lora_alpha=1e+308" in str(results["stored"])
        assert isinstance(results["good"], list) and rt.running


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_rows_are_exactly_those_with_a_nan_or_an_infinity(dtype):
    """Random logits with NaN, +inf, -inf and +inf beside -inf planted in some rows, and rows of
    huge finite logits whose sum overflows: the rows named are those with a non-finite logit,
    as testing every logit says, and no other."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 1000, generator=generator)
    planted = {3: [float("nan")], 7: [float("inf")], 8: [float("-inf")],
               21: [float("inf"), float("-inf")], 39: [float("nan"), float("inf")]}
    for row, values in planted.items():
        for value in values:
            logits[row, torch.randint(1000, (1,), generator=generator)] = value
    huge = torch.finfo(dtype).max / 4
    logits[[5, 30]] = huge  # finite; their sums overflow
    logits = logits.to(dtype)
    reference = [i for i in range(40) if not bool(torch.isfinite(logits[i]).all())]
    assert non_finite_rows(logits) == reference == sorted(planted)
    assert non_finite_rows(torch.randn(6, 1000).to(dtype)) == []
