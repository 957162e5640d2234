"""cotune's virtualized base against transformers + PEFT: logits of mixed batches, greedy
tokens, and LoRA gradients, on every supported Llama-family variant, with the batched torch
ops and with the Triton kernels (in Triton's interpreter where there is no GPU)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import LOGIT_ATOL, make_peft_adapter
from engine_helpers import run_to_completion
from parity import cotune_logits, cotune_trainable, relative_error
from peft_reference import (
    next_token_loss,
    peft_with_adapters,
    reference_greedy,
    reference_logits,
    reference_lora_grads,
    save_random_adapters,
)

from cotune.adapters.peft_format import (
    LoraAdapter,
    LoraModule,
    load_peft_adapter,
    save_peft_adapter,
)
from cotune.adapters.residency import ResidentAdapters
from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.sampling import SamplingParams
from cotune.model.llama import ForwardBatch
from cotune.model.loading import load_model
from cotune.model.lora_routing import LoraRouting


@pytest.fixture(autouse=True, params=["auto", "triton"])
def kernels(request, monkeypatch) -> str:
    """Every check with the ops COTUNE_KERNELS=auto picks here, and with Triton's."""
    monkeypatch.setenv("COTUNE_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("num_adapters", [1, 3, 8])
def test_mixed_batch_logits_match_peft(hf_checkpoint, tmp_path, seed, num_adapters):
    hf_model, base_dir = hf_checkpoint
    rng = random.Random(seed)
    dirs = save_random_adapters(hf_model, tmp_path, num_adapters, rng)
    model = load_model(base_dir)
    resident = ResidentAdapters(model, num_slots=8, max_rank=64)
    slots = [resident.load(str(d), d) for d in dirs]
    # Odd lengths; some rows on the base model alone; adapters repeated and interleaved.
    choices = [rng.choice([None, *range(num_adapters)]) for _ in range(9)]
    seqs = [torch.randint(0, model.config.vocab_size, (rng.choice([1, 2, 5, 7, 13]),))
            for _ in choices]
    logits = cotune_logits(model, seqs, [None if c is None else slots[c] for c in choices])
    reference = peft_with_adapters(hf_model, dirs)
    expected = torch.cat([reference_logits(reference, s, c) for s, c in zip(seqs, choices)])
    diff = (logits - expected).abs().max().item()
    assert diff <= LOGIT_ATOL[torch.float32], f"max |diff| {diff:.2e} (seed {seed})"


def test_greedy_tokens_match_peft_for_32_new_tokens(hf_checkpoint, tmp_path, seed):
    hf_model, base_dir = hf_checkpoint
    rng = random.Random(seed)
    dirs = save_random_adapters(hf_model, tmp_path, 4, rng)
    engine = Engine(load_model(base_dir), config=EngineConfig(num_slots=4))
    choices = [None, 0, 1, 2, 3, 1, None, 0]
    prompts = [torch.randint(0, engine.model.config.vocab_size, (rng.randint(1, 11),)).tolist()
               for _ in choices]
    seqs = [engine.add(p, SamplingParams(max_tokens=32),
                       None if c is None else (str(dirs[c]), dirs[c]))
            for p, c in zip(prompts, choices)]
    run_to_completion(engine)
    reference = peft_with_adapters(hf_model, dirs)
    for prompt, choice, seq in zip(prompts, choices, seqs):
        expected = reference_greedy(reference, prompt, choice, 32)
        assert seq.output_ids == expected, f"adapter {choice} (seed {seed})"


def _dora_and_lora(hf_model, tmp_path, rng) -> list:
    """Two DoRA adapters and two plain ones, on irregular ranks and targets."""
    dirs = []
    for i, (dora, r, targets) in enumerate([
            (True, 4, ["q_proj", "v_proj", "up_proj"]), (False, 8, ["q_proj", "k_proj"]),
            (True, 16, ["k_proj", "o_proj", "gate_proj", "down_proj"]),
            (False, 2, ["v_proj", "down_proj"])]):
        make_peft_adapter(hf_model, tmp_path / f"a{i}", r=r, alpha=2 * r, targets=targets,
                          seed=rng.randint(0, 10**6), dora=dora, rslora=i == 2)
        dirs.append(tmp_path / f"a{i}")
    return dirs


def test_dora_rows_beside_lora_and_base_rows_match_peft(hf_checkpoint, tmp_path, seed):
    hf_model, base_dir = hf_checkpoint
    rng = random.Random(seed)
    dirs = _dora_and_lora(hf_model, tmp_path, rng)
    model = load_model(base_dir)
    resident = ResidentAdapters(model, num_slots=4, max_rank=16)
    slots = [resident.load(str(d), d) for d in dirs]
    choices = [0, None, 2, 1, 0, 3, 2, None, 1]  # DoRA, base and plain LoRA rows interleaved
    seqs = [torch.randint(0, model.config.vocab_size, (rng.choice([1, 2, 5, 7, 13]),))
            for _ in choices]
    logits = cotune_logits(model, seqs, [None if c is None else slots[c] for c in choices])
    reference = peft_with_adapters(hf_model, dirs)
    expected = torch.cat([reference_logits(reference, s, c) for s, c in zip(seqs, choices)])
    diff = (logits - expected).abs().max().item()
    assert diff <= LOGIT_ATOL[torch.float32], f"max |diff| {diff:.2e} (seed {seed})"
    dora = resident.host.fetch("dora", dirs[0]).result()  # its A and B without DoRA differ:
    plain = LoraAdapter({n: LoraModule(m.a, m.b, m.scale) for n, m in dora.modules.items()},
                        {**dora.config, "use_dora": False})
    without = cotune_logits(model, seqs[:1], [resident.place("plain", plain)])
    assert (without - reference_logits(reference, seqs[0], 0)).abs().max() > 1e-3


def test_dora_greedy_tokens_match_peft_and_its_export_loads_in_peft(hf_checkpoint, tmp_path,
                                                                    seed):
    hf_model, base_dir = hf_checkpoint
    rng = random.Random(seed)
    dirs = _dora_and_lora(hf_model, tmp_path, rng)
    engine = Engine(load_model(base_dir), config=EngineConfig(num_slots=4, max_rank=16))
    choices = [2, 0, None, 1, 0, 3]
    prompts = [torch.randint(0, engine.model.config.vocab_size, (rng.randint(1, 11),)).tolist()
               for _ in choices]
    seqs = [engine.add(p, SamplingParams(max_tokens=24),
                       None if c is None else (str(dirs[c]), dirs[c]))
            for p, c in zip(prompts, choices)]
    run_to_completion(engine)
    reference = peft_with_adapters(hf_model, dirs)
    for prompt, choice, seq in zip(prompts, choices, seqs):
        assert seq.output_ids == reference_greedy(reference, prompt, choice, 24), \
            f"adapter {choice} (seed {seed})"
    loaded = load_peft_adapter(dirs[0], engine.adapters.base_modules, max_rank=16)
    save_peft_adapter(loaded, tmp_path / "exported")
    reference.load_adapter(tmp_path / "exported", adapter_name=f"a{len(dirs)}")
    ids = torch.tensor(prompts[1])
    torch.testing.assert_close(reference_logits(reference, ids, len(dirs)),
                               reference_logits(reference, ids, 0), rtol=0, atol=1e-6)


def test_lora_gradients_match_peft_in_a_mixed_batch(hf_checkpoint, tmp_path, seed):
    """Two adapters trained side by side with served and base rows; each adapter's dA, dB
    equal PEFT's for its own rows, and the served rows' logits are unchanged by training."""
    hf_model, base_dir = hf_checkpoint
    rng = random.Random(seed)
    dirs = save_random_adapters(hf_model, tmp_path, 3, rng)
    model = load_model(base_dir)
    resident = ResidentAdapters(model, num_slots=2, max_rank=64)
    served_slot = resident.load("served", dirs[2])
    trainables = [cotune_trainable(model, d) for d in dirs[:2]]
    # Sequences: trained on adapter 0, served, trained on 1, base only, trained on 0.
    owners = [trainables[0], served_slot, trainables[1], None, trainables[0]]
    lens = [7, 5, 13, 3, 2]
    seqs = [torch.randint(0, model.config.vocab_size, (n,)) for n in lens]
    batch = ForwardBatch(torch.cat(seqs), lens, lora=LoraRouting.from_sequences(lens, owners))
    per_seq = model.logits(model(batch)).split(lens)
    sum(next_token_loss(per_seq[i], seqs[i]) for i in (0, 2, 4)).backward()

    assert all(m.a_pool.grad is None and m.b_pool.grad is None
               for m in resident.modules.values())
    reference = peft_with_adapters(hf_model, dirs)
    for i, index in ((1, 2), (3, None)):
        diff = (per_seq[i].detach() - reference_logits(reference, seqs[i], index)).abs().max()
        assert diff <= LOGIT_ATOL[torch.float32], f"served/base row {i}: {diff:.2e}"
    for index, seq_ids in ((0, (0, 4)), (1, (2,))):
        expected = reference_lora_grads(reference, index, [seqs[i] for i in seq_ids],
                                        next_token_loss)
        assert len(expected) == 2 * len(trainables[index].module_names())
        for (module, part), ref_grad in expected.items():
            a, b, _ = trainables[index].weights(module)
            rel = relative_error((a if part == "a" else b).grad, ref_grad)
            assert rel <= 1e-4, f"{module}.{part}: relative error {rel:.2e} (seed {seed})"


def test_inference_rows_carry_no_autograd_state(hf_checkpoint, tmp_path, seed):
    hf_model, base_dir = hf_checkpoint
    dirs = save_random_adapters(hf_model, tmp_path, 1, random.Random(seed))
    model = load_model(base_dir)
    slot = ResidentAdapters(model, num_slots=1, max_rank=64).load("a", dirs[0])
    ids = torch.randint(0, model.config.vocab_size, (6,))
    hidden = model(ForwardBatch(ids, [6], lora=LoraRouting.from_sequences([6], [slot])))
    assert not hidden.requires_grad and hidden.grad_fn is None
