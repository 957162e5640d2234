"""The independent reference: transformers + PEFT, one sequence at a time."""

from __future__ import annotations

import torch
from conftest import make_peft_adapter, random_adapter_specs
from parity import relative_error
from peft import PeftModel


def save_random_adapters(hf_model, directory, count, rng, **overrides) -> list:
    """Saves `count` random PEFT adapters of `hf_model`; returns their directories."""
    dirs = []
    for i, spec in enumerate(random_adapter_specs(count, rng)):
        path = directory / f"adapter{i}"
        make_peft_adapter(hf_model, path, **{**spec, **overrides})
        dirs.append(path)
    return dirs


def peft_with_adapters(hf_model, dirs) -> PeftModel:
    """One PeftModel holding every adapter, named a0, a1, ..."""
    model = PeftModel.from_pretrained(hf_model, dirs[0], adapter_name="a0")
    for i, path in enumerate(dirs[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    return model.eval()


def reference_logits(peft_model, token_ids, adapter_index) -> torch.Tensor:
    """(n, vocab) logits of one sequence alone, with adapter a{i} or the base model (None)."""
    with torch.no_grad():
        if adapter_index is None:
            with peft_model.disable_adapter():
                return peft_model(token_ids[None]).logits[0]
        peft_model.set_adapter(f"a{adapter_index}")
        return peft_model(token_ids[None]).logits[0]


def reference_greedy(peft_model, prompt: list[int], adapter_index, new_tokens: int) -> list[int]:
    """Exactly `new_tokens` greedy tokens after `prompt` (no stop token)."""
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        if adapter_index is None:
            with peft_model.disable_adapter():
                return peft_model.generate(input_ids=ids, **kwargs)[0, len(prompt):].tolist()
        peft_model.set_adapter(f"a{adapter_index}")
        return peft_model.generate(input_ids=ids, **kwargs)[0, len(prompt):].tolist()


def with_column_major_weights(hf_model):
    """hf_model with every 2-D weight stored transposed, values unchanged: the same math in
    another GEMM order. How far the reference moves under it is float32's own noise on a
    model, the yardstick for bounds where activations are large (SmolLM2)."""
    for module in hf_model.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            module.weight.data = module.weight.data.t().contiguous().t()
    return hf_model


def reference_lora_grads(peft_model, adapter_index, sequences, loss_fn) -> dict:
    """{(base module path, 'a'|'b'): gradient} of adapter a{i} for the summed loss of
    `sequences`, each run alone."""
    name = f"a{adapter_index}"
    peft_model.zero_grad()
    peft_model.set_adapter(name)
    peft_model.train()
    sum(loss_fn(peft_model(s[None]).logits[0], s) for s in sequences).backward()
    peft_model.eval()
    grads = {}
    for param_name, p in peft_model.named_parameters():
        for part, key in (("lora_A", "a"), ("lora_B", "b")):
            marker = f".{part}.{name}.weight"
            if param_name.endswith(marker):
                module = param_name[: -len(marker)].removeprefix("base_model.model.")
                grads[(module, key)] = p.grad
    return grads


def next_token_loss(logits, token_ids) -> torch.Tensor:
    """Summed cross-entropy of predicting each next token."""
    return torch.nn.functional.cross_entropy(logits[:-1], token_ids[1:], reduction="sum")


def reference_batched_logits(peft_model, seqs, adapter_indices) -> list[torch.Tensor]:
    """Per sequence (n, vocab) logits from one right-padded PEFT batch with mixed adapters
    (PEFT's own `adapter_names`): the same math as one at a time, batched as PEFT batches it."""
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    names = ["__base__" if i is None else f"a{i}" for i in adapter_indices]
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    return [logits[i, : len(s)] for i, s in enumerate(seqs)]


def assert_grads_match_training_examples(reference, trainer, examples, context: str = ""):
    """Backward of PEFT's loss on `examples` (each alone, normalised by their target tokens,
    as a micro-batch), then the trainer's LoRA gradients against PEFT's within 1e-5."""
    loss = 0
    for example in examples:
        ids = torch.tensor(example.token_ids)
        logits = reference(ids[None]).logits[0, :-1]
        labels = torch.where(torch.tensor(example.loss_mask[1:]), ids[1:], -100)
        loss = loss + torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    (loss / sum(sum(e.loss_mask) for e in examples)).backward()
    for name in trainer.lora.module_names():
        a, b, _ = trainer.lora.weights(name)
        peft_layer = reference.get_submodule(f"base_model.model.{name}")
        for ours, theirs in ((a, peft_layer.lora_A["default"]), (b, peft_layer.lora_B["default"])):
            rel = relative_error(ours.grad, theirs.weight.grad)
            assert rel <= 1e-5, f"{name}: relative error {rel:.2e}{context}"


def start_as_peft(lora, reference) -> None:
    """Sets `lora` (a TrainableLora) to the weights of the adapter "default" of `reference` (a
    PeftModel): A and B, and a DoRA adapter's magnitudes."""
    with torch.no_grad():
        for name in lora.module_names():
            a, b, _ = lora.weights(name)
            layer = reference.get_submodule(f"base_model.model.{name}")
            a.copy_(layer.lora_A["default"].weight)
            b.copy_(layer.lora_B["default"].weight)
            if lora.magnitude(name) is not None:
                lora.magnitude(name).copy_(layer.lora_magnitude_vector["default"].weight)
