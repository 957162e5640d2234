"""The weights of an adapter being trained in the engine (a job's or an RL session's): made
new as PEFT makes them, set from a PEFT directory, and copied out as a PEFT adapter."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from cotune.adapters.peft_format import LoraAdapter, LoraModule, load_peft_adapter
from cotune.adapters.validation import AdapterError
from cotune.engine.finetune_spec import LoraSettings
from cotune.model.llama import CausalLM
from cotune.model.lora_routing import TrainableLora
from cotune.model.quantized import dense


def new_lora(settings: LoraSettings, seed: int, model: CausalLM) -> TrainableLora:
    """A as PEFT initialises it (Kaiming-uniform, a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))),
    B zero, so the new adapter starts as the base model; drawn from `seed`. With DoRA, each
    magnitude starts as the norm of its base weight's rows, as PEFT's does (B is zero)."""
    generator = torch.Generator().manual_seed(seed)
    modules, magnitudes = {}, {}
    for name, module in model.lora_modules(settings.targets).items():
        bound = 1.0 / math.sqrt(module.in_features)
        a = (torch.rand(settings.rank, module.in_features, generator=generator) * 2 - 1) * bound
        b = torch.zeros(module.out_features, settings.rank)
        modules[name] = (a, b, settings.scale)
        if settings.dora:
            magnitudes[name] = torch.linalg.norm(dense(module.weight).float(), dim=1).cpu()
    dropout_rng = torch.Generator().manual_seed(seed + 1)
    return TrainableLora(modules, dropout=settings.dropout, generator=dropout_rng,
                         magnitudes=magnitudes).to(model.device)


def load_lora_weights(lora: TrainableLora, settings: LoraSettings, model: CausalLM,
                      peft_dir: Path) -> None:
    """Sets the adapter's A and B to those of the PEFT directory `peft_dir` (refused unless it
    has these settings' rank and targets, on this base's shapes)."""
    shapes = {n: (m.in_features, m.out_features)
              for n, m in model.lora_modules(settings.targets).items()}
    saved = load_peft_adapter(peft_dir, shapes, settings.rank)
    if (saved.config.get("use_dora") is True) != settings.dora:
        raise AdapterError(
            f"{peft_dir} is {'a DoRA' if not settings.dora else 'a plain LoRA'} adapter, and "
            f"this training is {'DoRA' if settings.dora else 'plain LoRA'}; accepted: dora "
            f"{'on' if not settings.dora else 'off'} to continue it")
    with torch.no_grad():
        for name, module in saved.modules.items():
            a, b, _ = lora.weights(name)
            a.copy_(module.a)
            b.copy_(module.b)
            if module.magnitude is not None:
                lora.magnitude(name).copy_(module.magnitude)


def lora_snapshot(lora: TrainableLora, settings: LoraSettings) -> LoraAdapter:
    """The current weights as a PEFT adapter (a copy: training goes on)."""
    modules = {}
    for name in lora.module_names():
        a, b, scale = lora.weights(name)
        magnitude = lora.magnitude(name)
        modules[name] = LoraModule(a=a.detach().clone(), b=b.detach().clone(), scale=scale,
                                   magnitude=None if magnitude is None
                                   else magnitude.detach().clone())
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank,
              "lora_alpha": settings.alpha, "use_rslora": settings.rslora,
              "target_modules": sorted(settings.targets), "lora_dropout": settings.dropout,
              "bias": "none", "base_model_name_or_path": None, "use_dora": settings.dora}
    return LoraAdapter(modules=modules, config=config)
