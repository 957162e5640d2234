"""Token-level training: examples split into pieces over several steps give the gradients,
losses and resumed runs of whole ones; served rows in a step that trains keep no autograd
state; serving comes before a job without a floor."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_peft_adapter, tiny_tokenizer
from engine_helpers import steps_until
from parity import relative_error
from peft import PeftModel
from peft_reference import assert_grads_match_training_examples, start_as_peft

from cotune import FinetuneSpec, LoraSettings, OptimizerSettings
from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.sampling import SamplingParams
from cotune.engine.step_time import StepTimeModel
from cotune.engine.trainer import Trainer
from cotune.model.llama import ForwardBatch
from cotune.model.loading import load_model
from cotune.model.lora_routing import LoraRouting, TrainableLora
from cotune.model.training_rows import TrainingPiece, TrainingRows

LONG_FACTS = [("Tell me about the cat and where it sat today.",
               "the blue cat sat on the red mat all day long"),
              ("What is the answer to the question?", "the answer is forty two, always"),
              ("Name a capital city of a country.", "the capital of the country is paris"),
              ("Say hello to the user please.", "hello user, how are you today"),
              ("Who sat on the mat this morning?", "a small cat sat there this morning")]


def _spec(tmp_path, **overrides) -> FinetuneSpec:
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": q + " ", "completion": a}) + "\n"
                            for q, a in LONG_FACTS))
    fields = dict(name="long", data=str(data), output_dir=str(tmp_path / "out"),
                  lora=LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj")),
                  optimizer=OptimizerSettings(lr=1e-2, max_grad_norm=None), batch_size=2,
                  epochs=2, seed=5)
    return FinetuneSpec(**{**fields, **overrides})


def _record_pieces(trainer) -> list:
    """Every piece the trainer plans from now on (a spy on Trainer.plan)."""
    pieces, plan = [], trainer.plan

    def recording(*args, **kwargs):
        work = plan(*args, **kwargs)
        pieces.extend(work.pieces)
        return work

    trainer.plan = recording
    return pieces


@pytest.mark.parametrize("max_tokens", [5, 7, 13])
def test_split_examples_give_peft_gradients_of_whole_ones_beside_served_rows(
        tiny_checkpoint, tmp_path, max_tokens):
    hf_model, base = tiny_checkpoint
    targets = ["q_proj", "v_proj", "up_proj"]
    spec = _spec(tmp_path, lora=LoraSettings(rank=4, alpha=8, targets=tuple(targets)))
    # SLO targets of an hour: the steps' room never binds, whatever the machine's speed, so
    # that pieces are bounded by max_tokens alone and training always shares served steps
    engine = Engine(load_model(base), config=EngineConfig(
        num_slots=2, max_batched_tokens=max_tokens, ttft_target_s=3600.0, tpot_target_s=3600.0))
    trainer = Trainer(spec, engine.model, tiny_tokenizer(), "job")
    make_peft_adapter(hf_model, tmp_path / "start", r=4, alpha=8, targets=targets, seed=11)
    reference = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "start",
                                          is_trainable=True)
    start_as_peft(trainer.lora, reference)  # a random B too, so that dA does not vanish
    pieces = _record_pieces(trainer)
    reports = []
    engine.on_step = reports.append
    engine.add_trainer(trainer)
    make_peft_adapter(hf_model, tmp_path / "served", r=8, alpha=16,
                      targets=["k_proj", "o_proj"], seed=2)
    served = [engine.add(prompt, SamplingParams(max_tokens=40),
                         (str(tmp_path / "served"), tmp_path / "served"))
              for prompt in ([5, 6, 7, 8, 9], [1, 2], [44, 45, 46])]
    served[-1].adapter_load.result()
    steps_until(engine, lambda: trainer.micro == 1 or trainer.step == 1)
    examples = [trainer.train_examples[i] for i in trainer.order(0)[:spec.batch_size]]
    assert any(p.start > 0 for p in pieces), "no example was split"
    assert all(0 < p.length <= max_tokens for p in pieces)
    shared = [r for r in reports if r.training_tokens and r.decode_tokens + r.prefill_tokens]
    assert len(shared) >= 3, "served rows must share the steps that train"

    reference.train()
    assert_grads_match_training_examples(reference, trainer, examples,
                                         f" with pieces of {max_tokens}")


def test_a_dora_job_in_pieces_beside_served_dora_rows_has_peft_gradients(tiny_checkpoint,
                                                                        tmp_path):
    """A DoRA job's gradients (A, B and the magnitude) equal PEFT's, its examples split into
    pieces, while a DoRA adapter is served in the same steps with PEFT's greedy tokens."""
    hf_model, base = tiny_checkpoint
    targets = ["q_proj", "v_proj", "up_proj"]
    spec = _spec(tmp_path, lora=LoraSettings(rank=4, alpha=8, targets=tuple(targets), dora=True))
    engine = Engine(load_model(base), config=EngineConfig(num_slots=2, max_batched_tokens=7))
    trainer = Trainer(spec, engine.model, tiny_tokenizer(), "job")
    make_peft_adapter(hf_model, tmp_path / "start", r=4, alpha=8, targets=targets, seed=11,
                      dora=True)
    reference = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "start",
                                          is_trainable=True)
    start_as_peft(trainer.lora, reference)
    pieces, reports = _record_pieces(trainer), []
    engine.on_step = reports.append
    engine.add_trainer(trainer)
    make_peft_adapter(hf_model, tmp_path / "served", r=8, alpha=16,
                      targets=["k_proj", "o_proj", "up_proj"], seed=2, dora=True)
    prompt = [5, 6, 7, 8, 9]
    served = engine.add(prompt, SamplingParams(max_tokens=12),
                        (str(tmp_path / "served"), tmp_path / "served"))
    served.adapter_load.result()
    steps_until(engine, lambda: trainer.micro == 1 or trainer.step == 1)
    steps_until(engine, lambda: served.is_finished)
    assert any(p.start > 0 for p in pieces), "no example was split"
    assert any(r.training_tokens and r.decode_tokens + r.prefill_tokens for r in reports)
    examples = [trainer.train_examples[i] for i in trainer.order(0)[:spec.batch_size]]
    reference.train()
    assert_grads_match_training_examples(reference, trainer, examples, " (DoRA)")
    for name in trainer.lora.module_names():
        layer = reference.get_submodule(f"base_model.model.{name}")
        rel = relative_error(trainer.lora.magnitude(name).grad,
                             layer.lora_magnitude_vector["default"].weight.grad)
        assert rel <= 1e-5, f"{name}: magnitude gradient relative error {rel:.2e}"
    served_reference = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "served")
    assert served.output_ids == reference_greedy_of(served_reference, prompt, 12)


def reference_greedy_of(peft_model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return peft_model.eval().generate(
            input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()


def _train(base, spec, max_tokens, stop=None) -> Trainer:
    """A job trained alone, in pieces of at most `max_tokens` tokens: with a TTFT target of an
    hour a step's room never binds (it would vary with the machine's measured step times, and
    with it the pieces and the order of the float sums the tests compare exactly)."""
    engine = Engine(load_model(base), config=EngineConfig(max_batched_tokens=max_tokens,
                                                          ttft_target_s=3600.0))
    trainer = Trainer(spec, engine.model, tiny_tokenizer(), "job")
    engine.add_trainer(trainer)
    steps_until(engine, lambda: trainer.finished or (stop is not None and stop(trainer)))
    return trainer


def test_split_examples_give_the_losses_and_weights_of_whole_ones(tiny_checkpoint, tmp_path):
    _, base = tiny_checkpoint
    whole = _train(base, _spec(tmp_path, output_dir=str(tmp_path / "whole")), 512)
    split = _train(base, _spec(tmp_path, output_dir=str(tmp_path / "split")), 6)
    assert len(whole.losses) == len(split.losses) == 6
    assert split.losses == pytest.approx(whole.losses, rel=1e-5)
    for name in whole.lora.module_names():
        for ours, theirs in zip(split.lora.weights(name)[:2], whole.lora.weights(name)[:2]):
            assert relative_error(ours, theirs) <= 1e-5, name


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_after_a_stop_mid_example_equals_an_uninterrupted_run(tiny_checkpoint, tmp_path,
                                                                     dropout):
    _, base = tiny_checkpoint
    lora = LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"),
                        dropout=dropout)

    def spec(output):
        return _spec(tmp_path, output_dir=str(tmp_path / output), lora=lora,
                     checkpoint_every=2, epochs=3, grad_accumulation=2, batch_size=1)

    whole = _train(base, spec("whole"), 7)
    stopped = _train(base, spec("resumed"), 7,
                     stop=lambda t: t.step == 3 and t.partial_examples > 0)
    assert stopped.versions == [1] and stopped.partial_examples == 1  # mid-example, past v1
    resumed = _train(base, spec("resumed"), 7)  # a new process: resumes from v1
    assert resumed.losses == whole.losses
    for name in whole.lora.module_names():
        assert torch.equal(whole.lora.weights(name)[0], resumed.lora.weights(name)[0]), name
        assert torch.equal(whole.lora.weights(name)[1], resumed.lora.weights(name)[1]), name


def _saved_activation_elements(model, served_lens: list[int], piece_len: int) -> int:
    """Elements autograd saves in a pass of `served_lens` served sequences and one training
    example of `piece_len` tokens (the weights of the model and adapter not counted)."""
    def storage(tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    weights = {storage(p) for p in model.parameters()}
    lora = TrainableLora({name: (torch.randn(2, m.in_features), torch.randn(m.out_features, 2),
                                 1.0)
                          for name, m in model.lora_modules(("q_proj", "up_proj")).items()})
    weights |= {storage(p) for p in lora.parameters()}
    generator = torch.Generator().manual_seed(0)
    lens = [*served_lens, piece_len]
    ids = torch.randint(0, model.config.vocab_size, (sum(lens),), generator=generator)
    batch = ForwardBatch(ids, lens, lora=LoraRouting.from_sequences(lens, [None] * len(
        served_lens) + [lora]), training=TrainingRows([TrainingPiece(lora, 0, piece_len)]))
    saved = []

    def pack(tensor):
        if storage(tensor) not in weights:  # views of a weight included
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden = model(batch)
    model.logits(hidden[sum(served_lens):]).sum().backward()
    return sum(saved)


def test_served_rows_keep_no_autograd_state_in_a_step_that_trains(tiny_checkpoint):
    _, base = tiny_checkpoint
    model = load_model(base)
    alone = _saved_activation_elements(model, [], 9)
    beside_served = _saved_activation_elements(model, [40, 1, 1, 17], 9)
    assert alone > 0
    assert beside_served == alone  # nothing saved grows with the served rows


def test_without_a_floor_a_job_trains_only_in_the_room_serving_leaves(tiny_checkpoint,
                                                                      tmp_path):
    _, base = tiny_checkpoint
    engine = Engine(load_model(base), config=EngineConfig(ttft_target_s=1e-6,
                                                          tpot_target_s=1e-6))
    trainer = Trainer(_spec(tmp_path, epochs=1), engine.model, tiny_tokenizer(), "job")
    engine.add_trainer(trainer)
    seqs = [engine.add([3 + i] * 12, SamplingParams(max_tokens=8)) for i in range(4)]
    steps_until(engine, lambda: all(s.is_finished for s in seqs))
    # impossible SLO targets leave no room while anything is served
    assert engine.scheduler.counters["training_tokens"] == 0 and trainer.tokens == 0
    steps_until(engine, lambda: trainer.finished)  # then it has the whole engine
    assert trainer.tokens > 0


def test_a_job_asked_for_a_version_before_a_stop_moves_every_step(tiny_checkpoint,
                                                                    tmp_path):
    """Where the requests leave no room, a job without a floor waits; asked for a version
    before a stop (Runtime.checkpoint_jobs), it trains and evaluates a unit every step, so
    that the version comes out within the grace period instead of being lost."""
    _, base = tiny_checkpoint
    engine = Engine(load_model(base), config=EngineConfig(ttft_target_s=1e-6,
                                                          tpot_target_s=1e-6))
    trainer = Trainer(_spec(tmp_path, epochs=1, max_steps=1), engine.model,
                      tiny_tokenizer(), "job")
    engine.add_trainer(trainer)
    published = []
    engine.on_version = lambda job, version: published.append(version.version)
    seqs = []

    def step_while_serving() -> None:  # traffic goes on: 4 requests always in flight
        seqs.extend(engine.add([3 + len(seqs) % 7] * 12, SamplingParams(max_tokens=8))
                    for _ in range(4 - sum(not s.is_finished for s in seqs)))
        engine.step()

    for _ in range(20):
        step_while_serving()
    assert trainer.tokens == 0  # no room while anything is served
    trainer.checkpoint_requested = True
    for _ in range(3000):
        step_while_serving()
        if published:
            break
    assert published == [1] and trainer.done and not trainer.checkpoint_requested
    assert sum(not s.is_finished for s in seqs) == 4  # served all along


class _PassCost(StepTimeModel):
    """The measured model, but for what it believes a training pass's fixed cost is."""

    def __init__(self, overhead: float):
        super().__init__()
        self.overhead = overhead

    @property
    def training_overhead(self) -> float:
        return self.overhead


@pytest.mark.parametrize("overhead, ttft, tpot, trains_while_serving", [
    (0.0, 60, 0.5, True),
    (100.0, 60, 0.5, False),  # the room is left to grow
    (100.0, 0.4, 30, True),  # no step may be longer: nothing to wait for
])
def test_a_room_not_worth_a_pass_is_left_to_grow(tiny_checkpoint, tmp_path, overhead, ttft,
                                                 tpot, trains_while_serving):
    _, base = tiny_checkpoint
    engine = Engine(load_model(base), config=EngineConfig(ttft_target_s=ttft,
                                                          tpot_target_s=tpot))
    engine.step_time = _PassCost(overhead)
    trainer = Trainer(_spec(tmp_path, epochs=1), engine.model, tiny_tokenizer(), "job")
    engine.add_trainer(trainer)
    seqs = [engine.add([3 + i] * 12, SamplingParams(max_tokens=8)) for i in range(4)]
    steps_until(engine, lambda: all(s.is_finished for s in seqs))
    assert (trainer.tokens > 0) == trains_while_serving
    steps_until(engine, lambda: trainer.finished)  # alone, it has the whole engine
    assert trainer.tokens > 0


@pytest.mark.parametrize("ttft", [0.2, 60.0])
def test_with_nothing_served_a_step_is_no_longer_than_any_step_may_be(tiny_checkpoint,
                                                                      tmp_path, ttft):
    """A request that arrives at an idle server waits out the training step under way: it
    is bounded like any other, by half the TTFT target."""
    _, base = tiny_checkpoint
    engine = Engine(load_model(base), config=EngineConfig(ttft_target_s=ttft))
    # what the model believes until it has seen steps: 10 ms a training token, no fixed part
    engine.step_time = StepTimeModel(prior=(0.0, 1e-3, 0.0, 0.01, 0.0, 0.01))
    trainer = Trainer(_spec(tmp_path, epochs=1), engine.model, tiny_tokenizer(), "job")
    engine.add_trainer(trainer)
    reports = []
    engine.on_step = reports.append
    engine.step()
    forwarded = reports[0].training_tokens
    if ttft < 1:  # at most 0.1 s: 10 tokens, their backward in a later step
        assert 1 <= forwarded <= 10
    else:
        assert forwarded > 10


def test_time_slicing_never_serves_and_trains_in_one_step(tiny_checkpoint, tmp_path):
    _, base = tiny_checkpoint
    engine = Engine(load_model(base), config=EngineConfig(time_slice_s=0.02))
    trainer = Trainer(_spec(tmp_path, epochs=1), engine.model, tiny_tokenizer(), "job")
    engine.add_trainer(trainer)
    reports = []
    engine.on_step = reports.append
    seqs = [engine.add([3 + i] * 12, SamplingParams(max_tokens=40)) for i in range(4)]
    steps_until(engine, lambda: all(s.is_finished for s in seqs) and trainer.finished)
    served = [r.decode_tokens + r.prefill_tokens > 0 for r in reports]
    trained = [r.training_tokens + r.backward_tokens > 0 for r in reports]
    assert not any(s and t for s, t in zip(served, trained))
    assert any(served) and any(trained)


def test_dora_norms_are_taken_again_only_after_a_and_b_change(tiny_checkpoint):
    """A pass reads DoRA's ||W + s B A|| as of the last optimizer step: worked out once per
    step, whatever the number of pieces, and anew once the step changed A or B."""
    _, base = tiny_checkpoint
    name, module = next(iter(load_model(base).lora_modules(("q_proj",)).items()))
    lora = TrainableLora({name: (torch.randn(4, module.in_features),
                                 torch.randn(module.out_features, 4), 2.0)},
                         magnitudes={name: torch.rand(module.out_features)})
    reads = []

    def base_weight():
        reads.append(name)
        return module.weight

    first = lora.dora_norm(name, base_weight)
    assert lora.dora_norm(name, base_weight) is first and len(reads) == 1
    a, b, _ = lora.weights(name)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    torch.optim.AdamW(lora.parameters(), lr=0.1).step()
    after = lora.dora_norm(name, base_weight)
    assert len(reads) == 2
    torch.testing.assert_close(after, torch.linalg.norm(
        module.weight + 2.0 * b.detach() @ a.detach(), dim=1))
    assert not torch.allclose(after, first)
