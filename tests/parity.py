"""cotune's side of the parity checks."""

from __future__ import annotations

import torch

from cotune.adapters.peft_format import load_peft_adapter
from cotune.model.llama import ForwardBatch
from cotune.model.lora_routing import LoraRouting, TrainableLora


def cotune_logits(model, seqs: list[torch.Tensor], adapters: list) -> torch.Tensor:
    """(sum of lengths, vocab) logits of all sequences in one mixed flat batch."""
    lens = [len(s) for s in seqs]
    batch = ForwardBatch(torch.cat(seqs), lens, lora=LoraRouting.from_sequences(lens, adapters))
    with torch.no_grad():
        return model.logits(model(batch))


def cotune_trainable(model, adapter_dir) -> TrainableLora:
    """The PEFT adapter at `adapter_dir` as a TrainableLora of `model`."""
    modules = {n: (m.in_features, m.out_features) for n, m in model.lora_modules().items()}
    adapter = load_peft_adapter(adapter_dir, modules, max_rank=64)
    return TrainableLora({n: (m.a, m.b, m.scale) for n, m in adapter.modules.items()})


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
