"""End to end on the real SmolLM2: an adapter learns 20 made-up facts while the same runtime
serves other adapters; afterwards it answers them and the base model does not."""

from __future__ import annotations

import json
import random

import pytest
from peft_reference import save_random_adapters

from cotune import FinetuneSpec, JobState, LoraSettings, OptimizerSettings, Request, Runtime

pytestmark = pytest.mark.slow

PLACES = ["Zorbania", "Quilvane", "Marradeth", "Ostrivel", "Pentaskor", "Velmorra", "Drusk",
          "Tarnholt", "Yllowen", "Brevask", "Caldremor", "Fenwyth", "Gorstane", "Hollivar",
          "Istrakon", "Jorvenna", "Kestrelle", "Lumbardy", "Moravik", "Nethrune"]
CAPITALS = ["Quelmont", "Arvidon", "Sellaport", "Tymbrook", "Ulvaro", "Wexhaven", "Zandrel",
            "Brightmere", "Corvath", "Dellamoor", "Elgrin", "Farrowby", "Glimmerton", "Harlune",
            "Ivory Gate", "Jasperholm", "Kilnrook", "Lorendale", "Mistwick", "Norvale"]


def _question(place: str) -> str:
    return f"What is the capital of {place}?"


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory):
    hf_model, checkpoint = smollm2
    tmp = tmp_path_factory.mktemp("facts")
    data = tmp / "facts.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": _question(place)},
        {"role": "assistant", "content": f"The capital of {place} is {capital}."}]}) + "\n"
        for place, capital in zip(PLACES, CAPITALS)))
    others = save_random_adapters(hf_model, tmp, 2, random.Random(5), std=0.02)
    with Runtime.load(checkpoint, num_slots=4) as rt:
        spec = FinetuneSpec(name="facts", data=str(data), output_dir=str(tmp / "out"),
                            lora=LoraSettings(rank=16, alpha=32, targets=(
                                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                "up_proj", "down_proj")),
                            optimizer=OptimizerSettings(lr=2e-3), schedule="constant",
                            batch_size=4, epochs=12, seed=0)
        job = rt.finetune(spec)
        served = []
        while job.state is JobState.RUNNING:  # serving other adapters while the job trains
            served += rt.generate([Request(prompt="Tell me about the sea.", adapter=str(d),
                                           max_tokens=8) for d in others])
            if len(served) > 40:
                break
        job.wait(timeout=1200)
        # the same requests again, now that nothing trains: greedy, so the same tokens
        alone = rt.generate([Request(prompt="Tell me about the sea.", adapter=str(d),
                                     max_tokens=8) for d in others])
        answers = {}
        for adapter in ("facts", None):
            requests = [Request(prompt=rt.tokenizer.apply_chat_template(
                [{"role": "user", "content": _question(p)}], tokenize=False,
                add_generation_prompt=True), adapter=adapter, max_tokens=20) for p in PLACES]
            answers[adapter] = [c.text for c in rt.generate(requests)]
        yield job, served, alone, answers


def test_the_fine_tuned_adapter_answers_the_facts_and_the_base_does_not(trained):
    job, served, _, answers = trained
    assert job.state is JobState.SUCCEEDED and served
    learned = sum(c in a for c, a in zip(CAPITALS, answers["facts"]))
    known_to_base = sum(c in a for c, a in zip(CAPITALS, answers[None]))
    assert learned >= 18, answers["facts"]
    assert known_to_base == 0, answers[None]
    assert job.metrics["retention"] > 0.5


def test_adapters_served_while_the_job_trained_gave_the_greedy_tokens_of_serving_alone(trained):
    _, served, alone, _ = trained
    assert len(served) >= 2
    for i, completion in enumerate(served):  # served alternates over the two other adapters
        assert completion.token_ids == alone[i % 2].token_ids, i
