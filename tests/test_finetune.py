"""Fine-tuning inside the engine: gradients against PEFT, exact resume, versions that are
servable at once, and serving that is unchanged while a job trains."""

from __future__ import annotations

import copy
import json
import random
import shutil
import time

import pytest
import torch
from conftest import make_peft_adapter, tiny_tokenizer
from engine_helpers import steps_until
from peft import PeftModel
from peft_reference import assert_grads_match_training_examples, start_as_peft

from cotune import FinetuneSpec, JobState, LoraSettings, OptimizerSettings, Request, Runtime
from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.evaluation import Evaluation
from cotune.engine.finetune_spec import SpecError
from cotune.engine.sampling import SamplingParams
from cotune.engine.trainer import Trainer
from cotune.model.loading import load_model

FACTS = [("What colour is the cat?", "the cat is blue"),
         ("Where does the cat sit?", "on the mat"),
         ("What is the answer?", "forty two"),
         ("Name a capital city.", "the capital is paris"),
         ("Who sat on the mat?", "a cat sat"),
         ("What is a country?", "a country has a capital"),
         ("Say hello.", "hello user"),
         ("What is forty two?", "the answer")]


def _data(tmp_path, form="messages") -> str:
    path = tmp_path / f"{form}.jsonl"
    lines = []
    for question, answer in FACTS:
        if form == "messages":
            lines.append({"messages": [{"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}]})
        else:
            lines.append({"prompt": question + " ", "completion": answer})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _spec(tmp_path, **overrides) -> FinetuneSpec:
    fields = dict(name="facts", data=_data(tmp_path), output_dir=str(tmp_path / "out"),
                  lora=LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")),
                  optimizer=OptimizerSettings(lr=1e-2), batch_size=3, epochs=2, seed=3)
    return FinetuneSpec(**{**fields, **overrides})


def test_gradients_in_a_mixed_batch_equal_peft_on_the_same_data_alone(tiny_checkpoint,
                                                                     tmp_path):
    hf_model, base = tiny_checkpoint
    spec = _spec(tmp_path, optimizer=OptimizerSettings(lr=1e-3, max_grad_norm=None),
                 lora=LoraSettings(rank=4, alpha=8, rslora=True, targets=("q_proj", "up_proj")))
    engine = Engine(load_model(base), config=EngineConfig(num_slots=2))
    trainer = Trainer(spec, engine.model, tiny_tokenizer(), "job-test")
    # Start from random B (PEFT's zero B would make dA vanish) shared with the reference.
    peft_config = make_peft_adapter(hf_model, tmp_path / "start", r=4, alpha=8,
                                    targets=["q_proj", "up_proj"], rslora=True, seed=9)
    reference = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "start",
                                          is_trainable=True)
    assert peft_config.use_rslora
    start_as_peft(trainer.lora, reference)
    engine.add_trainer(trainer)
    # Served requests share every step with the training rows.
    served = make_peft_adapter(hf_model, tmp_path / "served", r=8, alpha=16,
                               targets=["k_proj", "o_proj"], seed=2)
    assert served.r == 8
    for prompt in ([5, 6, 7, 8, 9], [1, 2], [44, 45, 46]):
        seq = engine.add(prompt, SamplingParams(max_tokens=30),
                         (str(tmp_path / "served"), tmp_path / "served"))
    seq.adapter_load.result()  # read from disk in the background: ready before the first step
    steps_until(engine, lambda: trainer.step == 1)
    assert engine.scheduler.counters["prefill_tokens"] > 0

    examples = [trainer.train_examples[i] for i in trainer.order(0)[:spec.batch_size]]
    reference.train()
    assert_grads_match_training_examples(reference, trainer, examples)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resumed_job_continues_step_for_step(tiny_checkpoint, tmp_path, dropout):
    _, base = tiny_checkpoint
    lora = LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"),
                        dropout=dropout)
    tokenizer = tiny_tokenizer()

    def run(output_dir, stop_at=None):
        spec = _spec(tmp_path, output_dir=str(output_dir), checkpoint_every=2, epochs=3,
                     lora=lora, grad_accumulation=2, batch_size=2, warmup_steps=1)
        # Rooms far longer than any example: no step cuts one into pieces. (Where pieces go
        # follows the measured step times, which differ from run to run on a busy machine,
        # and so would the dropout masks and the order of float sums.)
        engine = Engine(load_model(base), config=EngineConfig(ttft_target_s=1000.0))
        trainer = Trainer(spec, engine.model, tokenizer, "job")
        engine.add_trainer(trainer)
        steps_until(engine, lambda: trainer.done or (trainer.step == stop_at
                                                     and not trainer.publishing))
        return trainer

    whole = run(tmp_path / "whole")
    assert whole.versions == [1, 2, 3] and len(whole.losses) == 6
    interrupted = run(tmp_path / "resumed", stop_at=2)  # v1 is published at step 2
    assert interrupted.versions == [1]
    # what a writer stopped mid-checkpoint leaves (v2's state, or v3's version, alone) goes
    adapter_dir = tmp_path / "resumed" / "facts"
    shutil.copytree(adapter_dir / "v1.state", adapter_dir / "v2.state")
    shutil.copytree(adapter_dir / "v1", adapter_dir / "v3")
    resumed = run(tmp_path / "resumed")  # a new process: resumes from v1
    assert resumed.losses == whole.losses
    for name in whole.lora.module_names():
        assert torch.equal(whole.lora.weights(name)[1], resumed.lora.weights(name)[1]), name


def test_serving_gives_the_same_tokens_while_a_job_trains(tiny_checkpoint, tmp_path):
    hf_model, base = tiny_checkpoint
    make_peft_adapter(hf_model, tmp_path / "served", r=8, alpha=16,
                      targets=["q_proj", "v_proj", "gate_proj"], seed=4)
    rng = random.Random(1)
    prompts = [[rng.randrange(320) for _ in range(rng.randint(1, 12))] for _ in range(6)]

    def serve(with_job):
        engine = Engine(load_model(base), config=EngineConfig(num_slots=2))
        if with_job:
            engine.add_trainer(Trainer(_spec(tmp_path, output_dir=str(tmp_path / "o")),
                                       engine.model, tiny_tokenizer(), "job"))
        seqs = [engine.add(p, SamplingParams(max_tokens=16),
                           None if i % 2 else (str(tmp_path / "served"), tmp_path / "served"))
                for i, p in enumerate(prompts)]
        steps_until(engine, lambda: all(s.is_finished for s in seqs))
        return [s.output_ids for s in seqs], engine.scheduler.counters["training_tokens"]

    alone, no_training = serve(False)
    with_job, trained = serve(True)
    assert no_training == 0 and trained > 0
    assert with_job == alone


def test_published_version_is_servable_at_once_and_equals_its_files(tiny_checkpoint, tmp_path):
    _, base = tiny_checkpoint
    with Runtime.load(base, num_slots=2) as rt:
        job = rt.finetune(_spec(tmp_path, checkpoint_every=2))
        job.wait(timeout=300)
        assert job.state is JobState.SUCCEEDED
        assert job.versions == ["facts@v1", "facts@v2", "facts@v3"]
        assert rt.engine.adapters.slot_of("facts@v3") is not None  # placed from memory
        request = dict(prompt_token_ids=[9, 10, 11], max_tokens=12)
        latest = rt.generate([Request(**request, adapter="facts")])[0]
        v1 = rt.generate([Request(**request, adapter="facts@v1")])[0]
        base_only = rt.generate([Request(**request)])[0]
        assert latest.token_ids != base_only.token_ids
    version_dir = tmp_path / "out" / "facts" / "v3"
    with Runtime.load(base) as fresh:  # another process serving the files
        from_files = fresh.generate([Request(**request, adapter=str(version_dir))])[0]
    assert from_files.token_ids == latest.token_ids
    assert v1.token_ids != latest.token_ids or v1.text == latest.text
    provenance = json.loads((tmp_path / "out" / "facts" / "v3.state" / "provenance.json")
                            .read_text())
    assert provenance["parent_version"] == 2 and provenance["job_id"] == job.id
    assert len(provenance["dataset_fingerprint"]) == 64 and provenance["base_fingerprint"]
    metrics = provenance["metrics"]
    assert metrics["general_loss_adapter"] > 0 and metrics["retention"] > 0


def test_a_dora_job_serves_its_versions_as_peft_loads_their_files(tiny_checkpoint, tmp_path):
    hf_model, base = tiny_checkpoint
    lora = LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), dora=True)
    with Runtime.load(base, num_slots=2) as rt:
        job = rt.finetune(_spec(tmp_path, lora=lora, optimizer=OptimizerSettings(lr=0.05)))
        job.wait(timeout=300)
        request = dict(prompt_token_ids=[9, 10, 11], max_tokens=12, ignore_eos=True)
        served = rt.generate([Request(**request, adapter="facts")])[0].token_ids
        base_only = rt.generate([Request(**request)])[0].token_ids
    version_dir = tmp_path / "out" / "facts" / "v1"
    config = json.loads((version_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True and served != base_only
    reference = PeftModel.from_pretrained(copy.deepcopy(hf_model), version_dir).eval()
    with torch.no_grad():
        expected = reference.generate(input_ids=torch.tensor([[9, 10, 11]]), max_new_tokens=12,
                                      min_new_tokens=12, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, 3:].tolist()
    assert served == expected


def test_job_metrics_report_eval_loss_and_retention(tiny_checkpoint, tmp_path):
    _, base = tiny_checkpoint
    with Runtime.load(base) as rt:
        job = rt.finetune(_spec(tmp_path, eval_fraction=0.25)).wait(timeout=300)
    metrics = job.metrics
    assert metrics["step"] == metrics["total_steps"] == 4  # 6 train examples, batch 3, 2 epochs
    assert metrics["eval_loss"] > 0 and 0 < metrics["retention"]
    assert metrics["losses"][-1] < metrics["losses"][0]


def test_a_versions_evaluation_runs_in_the_room_of_several_steps(tiny_checkpoint, tmp_path):
    """Publishing a version never holds up serving: its evaluation (eval loss, retention)
    runs a few examples a step, within each step's room, the job training no more meanwhile,
    and gives the metrics of an evaluation all at once."""
    _, base = tiny_checkpoint
    engine = Engine(load_model(base))
    trainer = Trainer(_spec(tmp_path, eval_fraction=0.25), engine.model, tiny_tokenizer(),
                      "job")
    cost = lambda forward, backward, passes: 0.01 * (forward + backward)  # noqa: E731
    longest = max(len(e.token_ids) for e in trainer.general_examples + trainer.eval_examples)
    room_tokens = 2 * longest
    room = 0.01 * room_tokens
    total = sum(len(e.token_ids) for e in trainer.eval_examples + 2 * trainer.general_examples)
    trainer.begin_checkpoint()
    shares = []
    while not trainer.checkpoint_ready:
        work = trainer.plan(room, cost, max_tokens=512)
        tokens = sum(item.tokens for item in work.evaluation)
        assert not work.pieces and not work.held_backward  # no training meanwhile
        assert work.evaluation and tokens <= room_tokens, tokens
        trainer.train(work, None, engine.model.logits, None)
        shares.append(tokens)
    assert sum(shares) == total and len(shares) >= total / room_tokens > 2
    everything = Evaluation(trainer.eval_examples, trainer.general_examples, trainer.lora, None)
    everything.run(everything.take_all(), engine.model)
    assert trainer.checkpoint().version == 1 and not trainer.publishing
    expected = everything.metrics()
    assert set(expected) == {"eval_loss", "general_loss_base", "general_loss_adapter",
                             "retention"}
    for name, value in expected.items():
        assert trainer.metrics[name] == pytest.approx(value, rel=1e-5), name
    assert trainer.plan(room, cost, max_tokens=512).pieces  # trains again


def test_bad_data_is_refused_before_the_job_starts(tiny_checkpoint, tmp_path):
    _, base = tiny_checkpoint
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"txt": "oops"}\n')
    with Runtime.load(base) as rt:
        with pytest.raises(ValueError, match=":2:"):
            rt.finetune(_spec(tmp_path, data=str(bad)))
        assert not rt.engine.trainers


def test_a_job_of_more_steps_than_the_wire_counts_is_refused_before_it_starts(
        tiny_checkpoint, tmp_path, monkeypatch):
    # MAX_STEPS is int32's limit; lowered here so that a few examples pass it (epochs x steps)
    monkeypatch.setattr("cotune.engine.trainer.MAX_STEPS", 3)
    _, base = tiny_checkpoint
    with Runtime.load(base) as rt:
        with pytest.raises(SpecError, match=r"the job would take 6 optimizer steps \(3 an "
                                            r"epoch, 2 epochs\); accepted: at most 3"):
            rt.finetune(_spec(tmp_path, batch_size=len(FACTS) // 3 + 1))
        assert not rt.engine.trainers
        assert rt.finetune(_spec(tmp_path, max_steps=3)).wait(timeout=120).state \
            is JobState.SUCCEEDED


def test_cancelled_job_stops_and_keeps_its_published_versions(tiny_checkpoint, tmp_path):
    _, base = tiny_checkpoint
    with Runtime.load(base) as rt:
        job = rt.finetune(_spec(tmp_path, epochs=5000, checkpoint_every=1))  # never ends alone
        deadline = time.monotonic() + 120
        while not job.versions:
            assert time.monotonic() < deadline, "no version was published"
            time.sleep(0.01)
        job.cancel()  # returns at once; the job stops at the next step boundary
        assert job.wait(timeout=60).state is JobState.CANCELLED and not rt.engine.trainers
        served = rt.generate([Request(prompt_token_ids=[3, 4], adapter="facts", max_tokens=3,
                                      ignore_eos=True)])[0]  # it may have learnt to stop
        assert served.completion_tokens == 3


@pytest.mark.parametrize("fields, message", [
    (dict(name="../escape"), "adapter name"),
    (dict(schedule="exponential"), "schedule"),
    (dict(batch_size=0), "batch_size 0 not accepted; accepted: a whole number from 1 to 4096"),
    (dict(batch_size=True), "batch_size True not accepted"),
    (dict(grad_accumulation=10**6), "grad_accumulation 1000000 not accepted; accepted: a whole "
                                    "number from 1 to 4096"),
    (dict(epochs=10**9), "epochs 1000000000 not accepted; accepted: a whole number from 1 to "
                         "10000"),
    (dict(max_steps=2**31), "max_steps 2147483648 not accepted; accepted: a whole number from 1 "
                            "to 2147483647"),
    (dict(max_length=0), "max_length 0 not accepted"),
    (dict(warmup_steps=-1), "warmup_steps -1 not accepted"),
    (dict(checkpoint_every=2**31), "checkpoint_every 2147483648 not accepted"),
    (dict(eval_fraction=1.0), r"eval_fraction 1.0 not accepted; accepted: a number in \[0, 1\)"),
    (dict(lora=dict(rank=0)), "rank 0 not accepted; accepted: a whole number from 1 to 1024"),
    (dict(lora=dict(rank=10**6)), "rank 1000000 not accepted"),
    (dict(lora=dict(alpha=1e308)), r"alpha 1e\+308 not accepted; accepted: a number in "
                                   r"\(0, 100000\]"),
    (dict(lora=dict(alpha=float("nan"))), "alpha nan not accepted"),
    (dict(lora=dict(targets=("c_attn",))), "targets"),
    (dict(lora=dict(dropout=1.0)), "dropout"),
    (dict(optimizer=dict(lr=0)), r"lr 0 not accepted; accepted: a number in \(0, 1\]"),
    (dict(optimizer=dict(lr=1e38)), r"lr 1e\+38 not accepted"),
    (dict(optimizer=dict(weight_decay=5.0)), r"weight_decay 5.0 not accepted; accepted: a number "
                                             r"in \[0, 1\]"),
    (dict(optimizer=dict(max_grad_norm=float("inf"))), "max_grad_norm inf not accepted"),
    (dict(min_share=1.0), r"min_share 1.0 not accepted; accepted: a number in \[0, 1\)"),
])
def test_bad_spec_is_refused_with_what_is_accepted(tmp_path, fields, message):
    with pytest.raises(SpecError, match=message):
        if "lora" in fields:
            fields["lora"] = LoraSettings(**fields["lora"])
        if "optimizer" in fields:
            fields["optimizer"] = OptimizerSettings(**fields["optimizer"])
        FinetuneSpec(**{"name": "x", "data": "d", "output_dir": str(tmp_path), **fields})
