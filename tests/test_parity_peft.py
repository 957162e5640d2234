"""cotune's virtualized base against transformers + PEFT: logits of mixed batches, greedy
tokens, and LoRA gradients, on every supported Llama-family variant."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import LOGIT_ATOL, make_peft_adapter, random_adapter_specs
from peft import PeftModel

from cotune.adapters.peft_format import load_peft_adapter
from cotune.adapters.residency import ResidentAdapters
from cotune.engine.generate import GenerationRequest, generate
from cotune.model.llama import ForwardBatch
from cotune.model.loading import load_model
from cotune.model.lora_routing import LoraRouting, TrainableLora


def _adapters(hf_model, tmp_path, count, rng):
    """Saves `count` random PEFT adapters; returns their directories."""
    dirs = []
    for i, spec in enumerate(random_adapter_specs(count, rng)):
        path = tmp_path / f"adapter{i}"
        make_peft_adapter(hf_model, path, **spec)
        dirs.append(path)
    return dirs


def _peft_reference(hf_model, dirs):
    """One PeftModel holding every adapter, named a0, a1, ..."""
    model = PeftModel.from_pretrained(hf_model, dirs[0], adapter_name="a0")
    for i, path in enumerate(dirs[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    return model.eval()


def _reference_logits(peft_model, token_ids, adapter_index):
    """(n, vocab) logits of one sequence alone, with adapter a{i} or the base model."""
    with torch.no_grad():
        if adapter_index is None:
            with peft_model.disable_adapter():
                return peft_model(token_ids[None]).logits[0]
        peft_model.set_adapter(f"a{adapter_index}")
        return peft_model(token_ids[None]).logits[0]


@pytest.mark.parametrize("num_adapters", [1, 3, 8])
def test_mixed_batch_logits_match_peft(hf_checkpoint, tmp_path, seed, num_adapters):
    hf_model, base_dir = hf_checkpoint
    rng = random.Random(seed)
    dirs = _adapters(hf_model, tmp_path, num_adapters, rng)
    model = load_model(base_dir)
    resident = ResidentAdapters(model, num_slots=8, max_rank=64)
    slots = [resident.load(str(d), d) for d in dirs]
    # Odd lengths; some rows on the base model alone; adapters repeated and interleaved.
    choices = [rng.choice([None, *range(num_adapters)]) for _ in range(9)]
    lens = [rng.choice([1, 2, 5, 7, 13]) for _ in choices]
    seqs = [torch.randint(0, model.config.vocab_size, (n,)) for n in lens]
    batch = ForwardBatch(torch.cat(seqs), lens, lora=LoraRouting.from_sequences(
        lens, [None if c is None else slots[c] for c in choices]))
    with torch.no_grad():
        logits = model.logits(model(batch))
    reference = _peft_reference(hf_model, dirs)
    expected = torch.cat([_reference_logits(reference, s, c) for s, c in zip(seqs, choices)])
    diff = (logits - expected).abs().max().item()
    assert diff <= LOGIT_ATOL[torch.float32], f"max |diff| {diff:.2e} (seed {seed})"


def test_greedy_tokens_match_peft_for_32_new_tokens(hf_checkpoint, tmp_path, seed):
    hf_model, base_dir = hf_checkpoint
    rng = random.Random(seed)
    dirs = _adapters(hf_model, tmp_path, 4, rng)
    model = load_model(base_dir)
    resident = ResidentAdapters(model, num_slots=4, max_rank=64)
    slots = [resident.load(str(d), d) for d in dirs]
    choices = [None, 0, 1, 2, 3, 1, None, 0]
    prompts = [torch.randint(0, model.config.vocab_size, (rng.randint(1, 11),)).tolist()
               for _ in choices]
    requests = [GenerationRequest(p, None if c is None else slots[c], max_tokens=32)
                for p, c in zip(prompts, choices)]
    completions = generate(model, requests, stop_token_ids=set())
    reference = _peft_reference(hf_model, dirs)
    for prompt, choice, completion in zip(prompts, choices, completions):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            if choice is None:
                with reference.disable_adapter():
                    out = reference.generate(input_ids=ids, max_new_tokens=32, do_sample=False,
                                             eos_token_id=None, min_new_tokens=32)
            else:
                reference.set_adapter(f"a{choice}")
                out = reference.generate(input_ids=ids, max_new_tokens=32, do_sample=False,
                                         eos_token_id=None, min_new_tokens=32)
        expected = out[0, len(prompt):].tolist()
        assert completion.token_ids == expected, f"adapter {choice} (seed {seed})"


def _trainable_from_dir(path, model):
    modules = {n: (m.in_features, m.out_features) for n, m in model.lora_modules().items()}
    adapter = load_peft_adapter(path, modules, max_rank=64)
    return TrainableLora({n: (m.a, m.b, m.scale) for n, m in adapter.modules.items()})


def _peft_lora_grads(peft_model, adapter_name):
    """{(base module path, 'a'|'b'): grad} of one PEFT adapter."""
    grads = {}
    for name, p in peft_model.named_parameters():
        for part, key in (("lora_A", "a"), ("lora_B", "b")):
            marker = f".{part}.{adapter_name}.weight"
            if name.endswith(marker):
                module = name[: -len(marker)].removeprefix("base_model.model.")
                grads[(module, key)] = p.grad
    return grads


def test_lora_gradients_match_peft_in_a_mixed_batch(hf_checkpoint, tmp_path, seed):
    """Two adapters trained side by side with served and base rows; each adapter's dA, dB
    equal PEFT's for its own rows, and the served rows' logits are unchanged by training."""
    hf_model, base_dir = hf_checkpoint
    rng = random.Random(seed)
    dirs = _adapters(hf_model, tmp_path, 3, rng)
    model = load_model(base_dir)
    resident = ResidentAdapters(model, num_slots=2, max_rank=64)
    served_slot = resident.load("served", dirs[2])
    trainables = [_trainable_from_dir(d, model) for d in dirs[:2]]
    # Sequences: trained on adapter 0, served, trained on 1, base only, trained on 0.
    owners = [trainables[0], served_slot, trainables[1], None, trainables[0]]
    lens = [7, 5, 13, 3, 2]
    seqs = [torch.randint(0, model.config.vocab_size, (n,)) for n in lens]
    batch = ForwardBatch(torch.cat(seqs), lens, lora=LoraRouting.from_sequences(lens, owners))
    logits = model.logits(model(batch))
    per_seq = logits.split(lens)
    loss = sum(_next_token_loss(per_seq[i], seqs[i]) for i in (0, 2, 4))
    loss.backward()

    assert resident.modules and all(m.a_pool.grad is None for m in resident.modules.values())
    reference = _peft_reference(hf_model, dirs)
    served = _reference_logits(reference, seqs[1], 2)
    assert (per_seq[1].detach() - served).abs().max() <= LOGIT_ATOL[torch.float32]
    for index, seq_ids in ((0, (0, 4)), (1, (2,))):
        reference.zero_grad()
        reference.set_adapter(f"a{index}")
        reference.train()
        ref_loss = sum(_next_token_loss(reference(seqs[i][None]).logits[0], seqs[i])
                       for i in seq_ids)
        ref_loss.backward()
        expected = _peft_lora_grads(reference, f"a{index}")
        trainable = trainables[index]
        assert expected, "PEFT produced no LoRA gradients"
        for (module, part), ref_grad in expected.items():
            a, b, _ = trainable.weights(module)
            grad = (a if part == "a" else b).grad
            rel = ((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-12)).item()
            assert rel <= 1e-4, f"{module}.{part}: relative error {rel:.2e} (seed {seed})"


def _next_token_loss(logits, token_ids):
    return torch.nn.functional.cross_entropy(logits[:-1], token_ids[1:], reduction="sum") \
        if len(token_ids) > 1 else logits.sum() * 0
