"""A base stored in 8 or 4 bits (`--quantize`) against transformers + PEFT on the same weights
read back (dequantized): logits of batches mixing LoRA, DoRA and base rows, greedy tokens and
LoRA gradients (QLoRA); bfloat16 through the packed kernels; the embedded SmolLM2's 4-bit GGUF
blocks served as they are; and the quantized base through the real server and the SDK."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import LOGIT_ATOL, make_peft_adapter, tiny_hf_model
from engine_helpers import run_to_completion
from parity import cotune_logits, cotune_trainable, relative_error
from peft_reference import (
    next_token_loss,
    peft_with_adapters,
    reference_greedy,
    reference_logits,
    reference_lora_grads,
)
from server_helpers import running_server, tiny_adapter_dir, tiny_model_dir

from cotune.adapters.residency import ResidentAdapters
from cotune.client import Client
from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.runtime import Runtime
from cotune.engine.sampling import SamplingParams
from cotune.model.gguf_int4 import INT4_FILE
from cotune.model.llama import ForwardBatch
from cotune.model.loading import load_model
from cotune.model.lora_routing import LoraRouting
from cotune.model.quantization import QuantizationError
from cotune.model.quantized import QuantizedRows, dense


@pytest.fixture(params=["int8", "int4"])
def kind(request) -> str:
    return request.param


@pytest.fixture(params=["llama2", "qwen2-bias"])
def checkpoint(request, tmp_path):
    """(transformers model, directory): projections' input widths are multiples of 32."""
    model = tiny_hf_model(request.param)
    model.save_pretrained(tmp_path / "base")
    return model, tmp_path / "base"


def dequantized(hf_model, model):
    """A copy of `hf_model` whose projections hold `model`'s quantized weights read back: the
    reference computes on exactly the weights cotune serves."""
    reference = copy.deepcopy(hf_model)
    for name, module in model.lora_modules().items():
        assert isinstance(module.weight, QuantizedRows), name
        reference.get_submodule(name).weight.data = dense(module.weight).float().clone()
    return reference


def lora_and_dora(hf_model, directory, rng) -> list:
    dirs = []
    for i, (dora, r, targets) in enumerate([
            (False, 8, ["q_proj", "v_proj", "down_proj"]),
            (True, 4, ["k_proj", "o_proj", "gate_proj", "up_proj"]),
            (False, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj"])]):
        make_peft_adapter(hf_model, directory / f"a{i}", r=r, alpha=2 * r, targets=targets,
                          seed=rng.randint(0, 10**6), dora=dora)
        dirs.append(directory / f"a{i}")
    return dirs


@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_mixed_batch_logits_match_peft_on_the_dequantized_weights(checkpoint, kind, kernels,
                                                                   tmp_path, seed):
    hf_model, base_dir = checkpoint
    rng = random.Random(seed)
    dirs = lora_and_dora(hf_model, tmp_path, rng)
    model = load_model(base_dir, quantize=kind, kernels=kernels)
    resident = ResidentAdapters(model, num_slots=3, max_rank=16)
    slots = [resident.load(str(d), d) for d in dirs]
    choices = [1, None, 0, 2, 1, None, 0]  # DoRA, base and LoRA rows interleaved
    seqs = [torch.randint(0, model.config.vocab_size, (rng.choice([1, 3, 7, 12]),))
            for _ in choices]
    logits = cotune_logits(model, seqs, [None if c is None else slots[c] for c in choices])
    reference = peft_with_adapters(dequantized(hf_model, model), dirs)
    expected = torch.cat([reference_logits(reference, s, c) for s, c in zip(seqs, choices)])
    diff = (logits - expected).abs().max().item()
    assert diff <= LOGIT_ATOL[torch.float32], f"max |diff| {diff:.2e} (seed {seed})"
    # and the quantization is not a no-op: the float base answers otherwise
    float_logits = cotune_logits(load_model(base_dir), seqs[1:2], [None])
    assert (float_logits - logits[:len(seqs[1])]).abs().max() > 10 * LOGIT_ATOL[torch.float32]


def test_greedy_tokens_match_peft_on_the_dequantized_weights(tiny_checkpoint, kind, tmp_path,
                                                              seed):
    hf_model, base_dir = tiny_checkpoint
    rng = random.Random(seed)
    dirs = lora_and_dora(hf_model, tmp_path, rng)
    engine = Engine(load_model(base_dir, quantize=kind), config=EngineConfig(num_slots=3,
                                                                                max_rank=16))
    choices = [0, None, 1, 2, 1]
    prompts = [torch.randint(0, engine.model.config.vocab_size, (rng.randint(1, 9),)).tolist()
               for _ in choices]
    seqs = [engine.add(p, SamplingParams(max_tokens=16),
                       None if c is None else (str(dirs[c]), dirs[c]))
            for p, c in zip(prompts, choices)]
    run_to_completion(engine)
    reference = peft_with_adapters(dequantized(hf_model, engine.model), dirs)
    for prompt, choice, seq in zip(prompts, choices, seqs):
        assert seq.output_ids == reference_greedy(reference, prompt, choice, 16), \
            f"adapter {choice} (seed {seed})"


def test_lora_gradients_on_the_quantized_base_match_peft(checkpoint, kind, tmp_path, seed):
    """QLoRA: an adapter trained on the quantized base beside served and base rows gets
    PEFT's gradients on the dequantized weights."""
    hf_model, base_dir = checkpoint
    rng = random.Random(seed)
    dirs = lora_and_dora(hf_model, tmp_path, rng)
    model = load_model(base_dir, quantize=kind)
    served = ResidentAdapters(model, num_slots=1, max_rank=16).load("served", dirs[1])
    trained = cotune_trainable(model, dirs[2])
    owners = [trained, served, None, trained]
    lens = [9, 4, 3, 6]
    seqs = [torch.randint(0, model.config.vocab_size, (n,)) for n in lens]
    batch = ForwardBatch(torch.cat(seqs), lens, lora=LoraRouting.from_sequences(lens, owners))
    per_seq = model.logits(model(batch)).split(lens)
    (next_token_loss(per_seq[0], seqs[0]) + next_token_loss(per_seq[3], seqs[3])).backward()
    reference = peft_with_adapters(dequantized(hf_model, model), dirs)
    expected = reference_lora_grads(reference, 2, [seqs[0], seqs[3]], next_token_loss)
    assert len(expected) == 2 * len(trained.module_names())
    for (module, part), want in expected.items():
        a, b, _ = trained.weights(module)
        rel = relative_error((a if part == "a" else b).grad, want)
        assert rel <= 1e-5, f"{module}.{part}: relative error {rel:.2e} (seed {seed})"


def test_bfloat16_runs_the_packed_kernels_within_bfloat16s_tolerance(checkpoint, kind,
                                                                     tmp_path, seed):
    hf_model, base_dir = checkpoint
    rng = random.Random(seed)
    dirs = lora_and_dora(hf_model, tmp_path, rng)[::2]  # LoRA adapters
    model = load_model(base_dir, dtype=torch.bfloat16, quantize=kind)
    resident = ResidentAdapters(model, num_slots=2, max_rank=16)
    slots = [resident.load(str(d), d) for d in dirs]
    choices = [0, None, 1, 0]
    seqs = [torch.randint(0, model.config.vocab_size, (rng.choice([2, 5, 11]),))
            for _ in choices]
    logits = cotune_logits(model, seqs, [None if c is None else slots[c] for c in choices])
    assert model(ForwardBatch(seqs[0], [len(seqs[0])])).dtype == torch.bfloat16
    reference = peft_with_adapters(dequantized(hf_model, model).to(torch.bfloat16), dirs)
    expected = torch.cat([reference_logits(reference, s, c) for s, c in zip(seqs, choices)])
    diff = (logits - expected.float()).abs().max().item()
    assert diff <= LOGIT_ATOL[torch.bfloat16], f"max |diff| {diff:.2e} (seed {seed})"


def test_smollm2s_4bit_blocks_are_served_as_they_are(smollm2):
    """The embedded model ships as Q4_1: its projections load from the blocks the converter
    kept, read back to exactly the weights of its float checkpoint."""
    _, checkpoint = smollm2
    assert (checkpoint / INT4_FILE).is_file()
    float_model = load_model(checkpoint)
    model = load_model(checkpoint, quantize="int4")
    for name, module in model.lora_modules().items():
        want = float_model.get_submodule(name).weight
        torch.testing.assert_close(dense(module.weight), want, rtol=0, atol=1e-6, msg=name)
    ids = torch.tensor([1, 504, 3458, 282, 4649, 314])
    with torch.no_grad():
        got = model.logits(model(ForwardBatch(ids, [len(ids)])))
        want = float_model.logits(float_model(ForwardBatch(ids, [len(ids)])))
    torch.testing.assert_close(got, want, rtol=0, atol=LOGIT_ATOL[torch.float32])


def test_bad_quantization_requests_are_refused_with_what_is_accepted(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint
    with pytest.raises(QuantizationError, match="'int2' is not supported; accepted: int8, int4"):
        Runtime.load(path, quantize="int2")
    with pytest.raises(QuantizationError, match="device cuda is not supported yet"):
        load_model(path, quantize="int4", device="cuda")
    narrow = tiny_hf_model("llama2")
    narrow.config.hidden_size = 48  # not a multiple of int4's groups of 32
    odd = type(narrow)(narrow.config)
    odd.save_pretrained(tmp_path / "odd")
    with pytest.raises(QuantizationError, match="multiples of 32.*int8 for any"):
        load_model(tmp_path / "odd", quantize="int4")
    assert load_model(tmp_path / "odd", quantize="int8") is not None


@pytest.mark.slow
def test_a_quantized_base_serves_and_trains_through_the_server(tmp_path):
    """Served greedy tokens equal PEFT's on the weights read back, and a job trains a QLoRA
    adapter on the quantized base, which then serves."""
    root = tmp_path / "server"
    adapter = tiny_adapter_dir(tmp_path / "adapter", seed=3, targets=("q_proj", "down_proj"))
    with running_server(root, "--quantize", "int4", "--dtype", "float32") as server, \
            Client(server.address, server.admin_token) as client:
        info = client.model_info()
        assert (info.quantization, info.dtype) == ("int4", "float32")
        client.adapters.create("qlora", adapter)
        prompt = [5, 9, 14, 3, 27]
        served = client.complete(prompt, adapter="qlora", max_tokens=12,
                                 ignore_eos=True).token_ids
        base = client.complete(prompt, max_tokens=12, ignore_eos=True).token_ids
        job = client.jobs.create("qlora-trained", b'{"prompt": "2+2=", "completion": "4"}\n' * 8,
                                 rank=4, max_steps=2, batch_size=2)
        done = client.jobs.wait(job.id, timeout=120)
        assert done.state == "succeeded", done
        trained = client.complete(prompt, adapter="qlora-trained", max_tokens=4,
                                  ignore_eos=True)
        assert len(trained.token_ids) == 4
    model = load_model(tiny_model_dir(root), quantize="int4")
    reference = peft_with_adapters(dequantized(tiny_hf_model("llama2"), model), [adapter])
    assert list(served) == reference_greedy(reference, prompt, 0, 12)
    assert list(base) == reference_greedy(reference, prompt, None, 12)
