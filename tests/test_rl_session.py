"""RL sessions in the engine (Runtime.open_session): ForwardBackward's losses and gradients
against PEFT and a plain torch reference, Forward against Generate's logprobs, sampling from
live weights after an OptimStep against a fresh runtime loading the saved version, one
weights version per request, and refusals that leave a session unchanged."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_peft_adapter
from parity import relative_error
from peft import PeftModel

from cotune import Datum, LoraSettings, LossSpec, OptimizerSettings, Request, Runtime, SessionSpec
from cotune.adapters.peft_format import AdapterError, save_peft_adapter
from cotune.engine.finetune_spec import SpecError
from cotune.engine.runtime import EngineStopped
from cotune.engine.session import SessionClosed, SessionFailed

TARGETS = ("q_proj", "v_proj", "up_proj")
PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], [44, 45, 46, 47]]


@pytest.fixture(scope="module")
def start_adapter(tiny_checkpoint, tmp_path_factory):
    """A PEFT adapter with random A and B (so that both get gradients), the session's start."""
    hf_model, _ = tiny_checkpoint
    path = tmp_path_factory.mktemp("start")
    make_peft_adapter(hf_model, path, r=4, alpha=8, targets=list(TARGETS), seed=11)
    return path


def _spec(start_adapter=None, **overrides) -> SessionSpec:
    fields = dict(name="policy", lora=LoraSettings(rank=4, alpha=8, targets=TARGETS),
                  optimizer=OptimizerSettings(lr=0.05, max_grad_norm=None),
                  init_adapter=start_adapter, seed=3)
    return SessionSpec(**{**fields, **overrides})


def _examples(seed: int = 0) -> list[Datum]:
    """Three examples of irregular lengths; prompt tokens weigh 0, the rest irregularly."""
    rng = torch.Generator().manual_seed(seed)
    data = []
    for length, prompt in ((9, 3), (14, 5), (6, 2)):
        ids = torch.randint(0, 200, (length,), generator=rng).tolist()
        weights = [0.0] * prompt + (torch.rand(length - prompt, generator=rng) + 0.5).tolist()
        data.append(Datum(ids, weights))
    return data


def _reference(hf_model, start_adapter) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(hf_model), start_adapter, is_trainable=True)


def _reference_logprobs(reference, datum: Datum) -> torch.Tensor:
    """(n,) logprob of each token under PEFT, 0 for token 0 (nothing predicts it)."""
    ids = torch.tensor(datum.token_ids)
    logits = reference(ids[None]).logits[0, :-1]
    chosen = torch.log_softmax(logits.float(), -1).gather(1, ids[1:, None])[:, 0]
    return torch.cat([torch.zeros(1), chosen])


def _assert_grads_match(handle, reference, context: str = "") -> None:
    lora = handle.session.lora
    for name in lora.module_names():
        a, b, _ = lora.weights(name)
        layer = reference.get_submodule(f"base_model.model.{name}")
        for ours, theirs in ((a, layer.lora_A["default"]), (b, layer.lora_B["default"])):
            rel = relative_error(ours.grad, theirs.weight.grad)
            assert rel <= 1e-5, f"{name}: relative error {rel:.2e}{context}"


@pytest.mark.parametrize("max_tokens", [7, 512])
def test_cross_entropy_gradients_equal_peft_beside_served_requests(
        tiny_checkpoint, start_adapter, max_tokens):
    hf_model, path = tiny_checkpoint
    data = _examples()
    with Runtime.load(path, num_slots=4, max_batched_tokens=max_tokens) as rt:
        handle = rt.open_session(_spec(start_adapter))
        served = [rt.stream(Request(prompt_token_ids=p, max_tokens=30, ignore_eos=True))
                  for p in PROMPTS]
        for stream in served:
            next(stream)  # the requests run while the session trains
        result = handle.forward_backward(data)
        for stream in served:
            assert sum(len(d.token_ids) for d in stream) > 0
    reference = _reference(hf_model, start_adapter)
    loss = 0
    for datum, logprobs in zip(data, result.logprobs):
        want = _reference_logprobs(reference, datum)
        assert torch.allclose(torch.tensor(logprobs), want.detach(), atol=1e-4)
        loss = loss - (torch.tensor(datum.weights) * want).sum()
    loss.backward()
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    assert result.weights_version == 0
    _assert_grads_match(handle, reference, f" in pieces of {max_tokens}")


def _sampled(data: list[Datum], reference, seed: int) -> list[Datum]:
    """The examples as a sampler returned them: 0/1 weights, the sampler's logprobs (PEFT's,
    moved so that ratios differ from 1, some past PPO's clip) and advantages of both signs."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for datum in data:
        n = len(datum.token_ids)
        mask = [0.0 if w == 0 else 1.0 for w in datum.weights]
        with torch.no_grad():
            current = _reference_logprobs(reference, datum)
        shift = (torch.rand(n, generator=rng) - 0.5) * 0.8
        sampled = torch.clamp(current + shift, max=0.0)
        sampled[0] = 0.0
        advantages = torch.randn(n, generator=rng)
        out.append(Datum(datum.token_ids, mask, sampled.tolist(), advantages.tolist()))
    return out


def _torch_loss(name: str, logprobs, weights, sampled, advantages, low=0.2, high=0.2):
    """The losses as Tinker documents them, written out here apart from cotune's."""
    ratio = torch.exp(logprobs - sampled)
    if name == "importance_sampling":
        return -(ratio * advantages * weights).sum()
    clipped = torch.clamp(ratio, 1 - low, 1 + high)
    return -(torch.min(ratio * advantages, clipped * advantages) * weights).sum()


@pytest.mark.parametrize("loss", [LossSpec("importance_sampling"),
                                  LossSpec("ppo", clip_low=0.1, clip_high=0.3)])
def test_rl_losses_and_gradients_equal_a_torch_reference(tiny_checkpoint, start_adapter, loss):
    hf_model, path = tiny_checkpoint
    reference = _reference(hf_model, start_adapter)
    data = _sampled(_examples(1), reference, seed=2)
    with Runtime.load(path, max_batched_tokens=11) as rt:
        handle = rt.open_session(_spec(start_adapter))
        result = handle.forward_backward(data, loss)
    want = 0
    for datum in data:
        args = [torch.tensor(v) for v in (datum.weights, datum.logprobs, datum.advantages)]
        want = want + _torch_loss(loss.name, _reference_logprobs(reference, datum), *args,
                                  loss.clip_low, loss.clip_high)
    want.backward()
    assert result.loss == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    _assert_grads_match(handle, reference, f" ({loss.name})")


def test_forward_logprobs_equal_those_generate_reported(tiny_checkpoint, start_adapter):
    _, path = tiny_checkpoint
    with Runtime.load(path) as rt:
        handle = rt.open_session(_spec(start_adapter))
        prompt = PROMPTS[0]
        done = rt.generate([Request(prompt_token_ids=prompt, session=handle, max_tokens=12,
                                    temperature=1.0, seed=4, logprobs=0, ignore_eos=True)])[0]
        result = handle.forward([Datum(prompt + done.token_ids)])
        grads = [p.grad for p in handle.session.lora.parameters()]
    got = result.logprobs[0][len(prompt):]
    want = [lp.logprob for lp in done.logprobs]
    assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-4
    assert result.loss is None and done.weights_version == 0
    assert all(g is None for g in grads), "a Forward computes no gradients"


def _greedy(rt, prompt, **source) -> list[int]:
    return rt.generate([Request(prompt_token_ids=prompt, max_tokens=16, ignore_eos=True,
                                **source)])[0].token_ids


def test_after_an_optim_step_the_live_weights_sample_as_the_saved_version_loaded_anew(
        tiny_checkpoint, start_adapter, tmp_path):
    _, path = tiny_checkpoint
    with Runtime.load(path) as rt:
        handle = rt.open_session(_spec(start_adapter, optimizer=OptimizerSettings(lr=0.2)))
        before = [_greedy(rt, p, session=handle) for p in PROMPTS]
        handle.forward_backward(_examples())
        step = handle.optim_step()
        assert (step.steps, step.weights_version) == (1, 1) and step.grad_norm > 0
        after = rt.generate([Request(prompt_token_ids=p, max_tokens=16, ignore_eos=True,
                                     session=handle) for p in PROMPTS])
        saved = handle.save()
        save_peft_adapter(saved.adapter, tmp_path / "saved")
    assert all(c.weights_version == 1 for c in after)
    assert [c.token_ids for c in after] != before, "the step changed no greedy token"
    assert saved.steps == 1 and saved.weights_version == 1
    assert saved.provenance["session_id"] == handle.id
    with Runtime.load(path) as fresh:
        assert [_greedy(fresh, p, adapter=str(tmp_path / "saved")) for p in PROMPTS] == \
            [c.token_ids for c in after]


def test_a_request_in_flight_across_an_optim_step_samples_from_one_version(
        tiny_checkpoint, start_adapter, tmp_path):
    _, path = tiny_checkpoint
    with Runtime.load(path) as rt:
        handle = rt.open_session(_spec(start_adapter, optimizer=OptimizerSettings(lr=0.2)))
        save_peft_adapter(handle.save().adapter, tmp_path / "v0")
        handle.forward_backward(_examples())
        stream = rt.stream(Request(prompt_token_ids=PROMPTS[1], max_tokens=40,
                                   ignore_eos=True, session=handle))
        deltas = [next(stream)]
        handle.optim_step()  # while the request decodes
        deltas += list(stream)
        newer = rt.generate([Request(prompt_token_ids=PROMPTS[1], max_tokens=40,
                                     ignore_eos=True, session=handle)])[0]
    assert {d.weights_version for d in deltas} == {0} and newer.weights_version == 1
    tokens = [t for d in deltas for t in d.token_ids]
    with Runtime.load(path) as fresh:
        assert fresh.generate([Request(prompt_token_ids=PROMPTS[1], max_tokens=40,
                                       ignore_eos=True, adapter=str(tmp_path / "v0"))]
                              )[0].token_ids == tokens
    assert newer.token_ids != tokens, "the step changed no greedy token"


def _bad(datum: Datum, **changes) -> Datum:
    fields = dict(token_ids=datum.token_ids, weights=datum.weights, logprobs=datum.logprobs,
                  advantages=datum.advantages)
    return Datum(**{**fields, **changes})


def test_bad_input_is_refused_at_once_and_leaves_the_session_unchanged(tiny_checkpoint,
                                                                       start_adapter):
    _, path = tiny_checkpoint
    good = _examples()[0]
    n = len(good.token_ids)
    sampled = Datum(good.token_ids, [0.0] * 3 + [1.0] * (n - 3), [-1.0] * n, [0.5] * n)
    ppo = LossSpec("ppo")
    bad = [
        ([_bad(good, weights=good.weights[:-1])], LossSpec(), "weights for"),
        ([_bad(sampled, advantages=(math.nan,) * n)], ppo, "finite"),
        ([_bad(sampled, weights=(0.0,) + (0.5,) * (n - 1))], ppo, "0 or 1"),
        ([_bad(sampled, logprobs=None)], LossSpec("importance_sampling"), "needs per-token"),
        ([_bad(good, weights=(1.0,) * n)], LossSpec(), "predicted by nothing"),
        ([_bad(good, token_ids=(5, 10**6))], LossSpec(), "outside the vocabulary"),
        ([], LossSpec(), "at least one example"),
    ]
    with Runtime.load(path) as rt:
        handle = rt.open_session(_spec(start_adapter))
        before = handle.forward([good]).logprobs
        for data, loss, message in bad:
            with pytest.raises(SpecError, match=message):
                handle.forward_backward(data, loss)
        with pytest.raises(SpecError, match="not accepted; choose from cross_entropy"):
            LossSpec("kl")
        assert handle.forward([good]).logprobs == before
        assert all(p.grad is None for p in handle.session.lora.parameters())
        assert handle.optim_step().grad_norm == 0.0  # nothing was accumulated


def test_a_loss_that_is_not_finite_fails_its_call_and_the_session_goes_on(tiny_checkpoint,
                                                                           start_adapter):
    _, path = tiny_checkpoint
    good = _examples()[0]
    n = len(good.token_ids)
    huge = Datum(good.token_ids, [0.0] + [1.0] * (n - 1), [-3e38] * n, [1e6] * n)
    with Runtime.load(path) as rt:
        handle = rt.open_session(_spec(start_adapter))
        with pytest.raises(SessionFailed, match="gradients accumulated since the last"):
            handle.forward_backward([huge], LossSpec("importance_sampling"))
        assert all(p.grad is None for p in handle.session.lora.parameters())
        assert handle.forward_backward([good]).loss > 0  # it goes on
        assert handle.optim_step().weights_version == 1


def test_a_step_that_fails_on_a_sessions_rows_fails_its_call_and_the_session_goes_on(
        tiny_checkpoint, start_adapter):
    _, path = tiny_checkpoint
    with Runtime.load(path) as rt:
        handle = rt.open_session(_spec(start_adapter))
        model = rt.engine.model
        forward = model.forward

        def failing(batch):  # a pass with training rows fails, again when they run alone
            if batch.training is not None:
                raise RuntimeError("a kernel failed")
            return forward(batch)

        model.forward = failing
        with pytest.raises(SessionFailed, match="a kernel failed"):
            handle.forward_backward(_examples())
        model.forward = forward
        assert handle.session in rt.engine.trainers  # not ended as a job would be
        assert handle.forward_backward(_examples()).loss > 0  # it goes on
        assert handle.optim_step().weights_version == 1


def test_a_closed_session_takes_nothing_and_a_stop_fails_what_waits(tiny_checkpoint,
                                                                   start_adapter):
    _, path = tiny_checkpoint
    rt = Runtime.load(path)
    handle = rt.open_session(_spec(start_adapter))
    handle.close()
    with pytest.raises(SessionClosed):
        handle.forward([_examples()[0]])
    with pytest.raises(SessionClosed):
        rt.generate([Request(prompt_token_ids=[1, 2], session=handle)])
    other = rt.open_session(_spec(start_adapter))
    pending = [other.submit_forward_backward(_examples(i)) for i in range(3)]
    rt.close()
    for future in pending:  # each either ran before the stop or ended with it
        assert future.exception() is None or isinstance(future.exception(), EngineStopped)
    with pytest.raises(EngineStopped):
        other.submit_forward([_examples()[0]])


def test_a_session_trains_in_the_serving_steps_while_a_lane_trains_the_jobs(tiny_checkpoint,
                                                                             start_adapter):
    _, path = tiny_checkpoint
    with Runtime.load(path, num_threads=1, training_threads=1) as rt:
        handle = rt.open_session(_spec(start_adapter))
        assert handle.forward_backward(_examples()).loss > 0
        assert handle.optim_step().weights_version == 1


def test_a_dora_version_is_refused_as_a_start_until_dora_trains(tiny_checkpoint, tmp_path):
    hf_model, path = tiny_checkpoint
    make_peft_adapter(hf_model, tmp_path / "dora", r=4, alpha=8, targets=list(TARGETS),
                      dora=True)
    with Runtime.load(path) as rt, pytest.raises(AdapterError, match="is a DoRA adapter"):
        rt.open_session(_spec(tmp_path / "dora"))
