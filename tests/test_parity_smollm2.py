"""The parity checks on the real SmolLM2-135M-Instruct: cotune loading its own conversion of
the embedded GGUF against transformers + PEFT loading the same GGUF."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import LOGIT_ATOL
from engine_helpers import run_to_completion
from parity import cotune_logits, cotune_trainable, relative_error
from peft_reference import (
    next_token_loss,
    peft_with_adapters,
    reference_batched_logits,
    reference_greedy,
    reference_logits,
    reference_lora_grads,
    save_random_adapters,
    with_column_major_weights,
)

from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.sampling import SamplingParams
from cotune.model.llama import ForwardBatch
from cotune.model.loading import load_model
from cotune.model.lora_routing import LoraRouting
from cotune.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "LoRA adapters are"]


@pytest.fixture(scope="module")
def setup(smollm2, tmp_path_factory):
    hf_model, checkpoint = smollm2
    directory = tmp_path_factory.mktemp("smollm2-adapters")
    dirs = save_random_adapters(hf_model, directory, 3, random.Random(7), std=0.02)
    model = load_model(checkpoint)
    engine = Engine(model, config=EngineConfig(num_slots=3))
    slots = [engine.adapters.load(str(d), d) for d in dirs]
    reference = peft_with_adapters(copy.deepcopy(hf_model), dirs)
    prompts = [load_tokenizer(checkpoint)(p).input_ids for p in PROMPTS]
    return engine, slots, reference, prompts, dirs


@pytest.fixture(scope="module")
def reordered(smollm2, setup):
    """The reference again with its GEMMs in another order (transposed weight storage)."""
    return peft_with_adapters(with_column_major_weights(copy.deepcopy(smollm2[0])), setup[4])


@pytest.fixture(scope="module")
def exact(smollm2, setup):
    """The reference in float64: exact, as far as float32 results can tell."""
    return peft_with_adapters(copy.deepcopy(smollm2[0]).double(), setup[4]).double()


def test_smollm2_each_sequence_alone_matches_peft(setup, reordered):
    """Within 1e-4 or twice what the reference itself moves when its GEMMs run in another
    order: SmolLM2's hidden states reach ~2e4, so float32 rounding alone shows at 1e-4."""
    engine, slots, reference, prompts, _ = setup
    model = engine.model
    for prompt, choice in zip(prompts, [0, None, 2, 1]):
        seq = torch.tensor(prompt)
        logits = cotune_logits(model, [seq], [None if choice is None else slots[choice]])
        want = reference_logits(reference, seq, choice)
        noise = (reference_logits(reordered, seq, choice) - want).abs().max().item()
        diff = (logits - want).abs().max().item()
        assert diff <= max(LOGIT_ATOL[torch.float32], 2 * noise), (
            f"adapter {choice}: max |diff| {diff:.2e}, the reference's own GEMM-order noise "
            f"{noise:.2e}")


def test_smollm2_mixed_batch_logits_match_peft(setup):
    """SmolLM2's hidden states reach ~2e4, so float32 rounding that depends on how many rows
    a GEMM holds moves its logits by ~1e-4: PEFT batched against PEFT one sequence at a time
    differs that much by itself. The bound is 1e-4 or twice PEFT's own batching noise."""
    engine, slots, reference, prompts, _ = setup
    model = engine.model
    choices = [0, None, 2, 1]
    seqs = [torch.tensor(p) for p in prompts]
    logits = cotune_logits(model, seqs, [None if c is None else slots[c] for c in choices])
    single = [reference_logits(reference, s, c) for s, c in zip(seqs, choices)]
    batched = reference_batched_logits(reference, seqs, choices)
    peft_noise = max((b - s).abs().max().item() for b, s in zip(batched, single))
    diff = (logits - torch.cat(single)).abs().max().item()
    bound = max(LOGIT_ATOL[torch.float32], 2 * peft_noise)
    assert diff <= bound, f"max |diff| {diff:.2e}, PEFT's own batching noise {peft_noise:.2e}"


def test_smollm2_greedy_tokens_match_peft_for_32_new_tokens(setup):
    engine, _, reference, prompts, dirs = setup
    choices = [None, 0, 1, 2]
    seqs = [engine.add(p, SamplingParams(max_tokens=32),
                       None if c is None else (str(dirs[c]), dirs[c]))
            for p, c in zip(prompts, choices)]
    run_to_completion(engine)
    for prompt, choice, seq in zip(prompts, choices, seqs):
        assert seq.output_ids == reference_greedy(reference, prompt, choice, 32), choice


def test_smollm2_lora_gradients_match_peft(setup, reordered, exact):
    """Against PEFT in float64, each LoRA gradient is within twice the worst error of PEFT's
    own float32 gradients (in either GEMM order, over all modules): float32's noise on this
    model, which reaches 1.5e-4 on a module, and differs from one module to the next with the
    order of the GEMMs alone."""
    engine, _, reference, prompts, dirs = setup
    model = engine.model
    trainable = cotune_trainable(model, dirs[1])
    seqs = [torch.tensor(p) for p in prompts[:2]]
    lens = [len(s) for s in seqs]
    batch = ForwardBatch(torch.cat(seqs), lens,
                         lora=LoraRouting.from_sequences(lens, [trainable, trainable]))
    per_seq = model.logits(model(batch)).split(lens)
    sum(next_token_loss(logits, s) for logits, s in zip(per_seq, seqs)).backward()
    want = reference_lora_grads(exact, 1, seqs, next_token_loss)
    assert len(want) == 2 * len(trainable.module_names())
    noise = max(relative_error(grads[key].double(), want[key]) for peft_model in
                (reference, reordered) for grads in
                [reference_lora_grads(peft_model, 1, seqs, next_token_loss)] for key in want)
    for (module, part), exact_grad in want.items():
        a, b, _ = trainable.weights(module)
        rel = relative_error((a if part == "a" else b).grad.double(), exact_grad)
        assert rel <= 2 * noise, (
            f"{module}.{part}: relative error {rel:.2e} against float64 PEFT; float32 PEFT's "
            f"own reaches {noise:.2e}")
