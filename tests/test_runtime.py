"""`cotune.Runtime` on the real default model: batches, streams, stops, aborts."""

from __future__ import annotations

import random

import pytest
import torch
from peft_reference import save_random_adapters

from cotune import Request, Runtime

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runtime(smollm2, tmp_path_factory):
    hf_model, checkpoint = smollm2
    dirs = save_random_adapters(hf_model, tmp_path_factory.mktemp("rt-adapters"), 2,
                                random.Random(3), std=0.02)
    with Runtime.load(checkpoint, num_slots=2) as rt:
        rt.register_adapter("tenant/first", dirs[0])
        yield rt, dirs


def test_stream_yields_the_same_tokens_and_text_as_generate(runtime):
    rt, dirs = runtime
    request = Request(prompt="The three primary colours are", adapter="tenant/first",
                      max_tokens=20, logprobs=2)
    completion = rt.generate([request])[0]
    deltas = list(rt.stream(request))
    assert [t for d in deltas for t in d.token_ids] == completion.token_ids
    assert "".join(d.text for d in deltas) == completion.text
    assert deltas[-1].finish_reason == completion.finish_reason
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert len(completion.logprobs) == len(completion.token_ids)
    assert all(lp.token_id == t for lp, t in zip(completion.logprobs, completion.token_ids))


def test_batch_of_mixed_adapters_equals_each_request_alone(runtime):
    rt, dirs = runtime
    requests = [Request(prompt=p, adapter=a, max_tokens=12)
                for p, a in [("Once upon a time", None), ("def add(a, b):", str(dirs[1])),
                             ("Paris is", "tenant/first"), ("Hello", str(dirs[1]))]]
    batched = rt.generate(requests)
    alone = [rt.generate([r])[0] for r in requests]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.text for c in batched] == [c.text for c in alone]


def test_stop_string_cuts_the_text_before_it(runtime):
    rt, _ = runtime
    free = rt.generate([Request(prompt="Count: one, two, three,", max_tokens=16)])[0]
    words = free.text.split()
    assert len(words) >= 2, free.text
    stop = words[1]
    stopped = rt.generate([Request(prompt="Count: one, two, three,", max_tokens=16,
                                   stop=[stop])])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]


def test_closing_a_stream_early_aborts_it_and_frees_its_cache(runtime):
    rt, _ = runtime
    stream = rt.stream(Request(prompt="Tell me a long story.", max_tokens=200,
                               ignore_eos=True))
    next(stream)
    stream.close()
    completion = rt.generate([Request(prompt="Hi", max_tokens=2)])[0]
    assert completion.completion_tokens == 2
    cache = rt.engine.cache
    assert cache.free_blocks == cache.num_blocks


def test_one_bad_request_fails_the_call_and_queues_nothing(runtime):
    rt, _ = runtime
    with pytest.raises(FileNotFoundError, match="neither a registered adapter"):
        rt.generate([Request(prompt="ok"), Request(prompt="x", adapter="tenant/missing")])
    with pytest.raises(ValueError, match="top_p"):
        rt.generate([Request(prompt="ok"), Request(prompt="x", top_p=0)])
    assert not rt.engine.has_work


def test_seeded_sampling_is_reproducible_in_any_batch(runtime):
    rt, _ = runtime
    request = Request(prompt="My favourite food is", temperature=0.9, top_p=0.9, top_k=50,
                      seed=1234, max_tokens=16)
    alone = rt.generate([request])[0].token_ids
    crowd = rt.generate([Request(prompt="Filler", temperature=1.0, max_tokens=16), request])
    assert crowd[1].token_ids == alone
    assert torch.tensor(alone).numel() == 16 or crowd[1].finish_reason == "stop"


def test_after_the_engine_fails_new_work_is_refused_at_once_not_left_waiting(tiny_checkpoint):
    from cotune.engine.runtime import EngineStopped

    with Runtime.load(tiny_checkpoint[1]) as broken:
        def fail(**_):
            raise RuntimeError("a kernel blew up")

        broken.engine.step = fail
        with pytest.raises(EngineStopped, match="a kernel blew up"):
            broken.generate([Request(prompt="the cat", max_tokens=4)])
        assert isinstance(broken.error, RuntimeError)
        with pytest.raises(EngineStopped, match="start the runtime again"):
            broken.generate([Request(prompt="the cat", max_tokens=4)])
