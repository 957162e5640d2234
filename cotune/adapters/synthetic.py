"""Random LoRA adapters for demos and benchmarks (never for tests of correctness: those
use real PEFT adapters)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cotune.adapters.peft_format import LoraAdapter, LoraModule


def random_adapter(base_modules: Mapping[str, tuple[int, int]], rank: int,
                   targets: list[str], seed: int, b_std: float = 0.02,
                   device: torch.device | str = "cpu") -> LoraAdapter:
    """A rank-`rank` adapter on every base module whose name ends in one of `targets`:
    A ~ N(0, 1/d_in), B ~ N(0, b_std^2), alpha = 2 * rank; drawn on `device` (drawing a
    thousand adapters of a large base on the CPU is slow)."""
    generator = torch.Generator(device).manual_seed(seed)
    modules = {}
    for name, (d_in, d_out) in base_modules.items():
        if name.rsplit(".", 1)[-1] in targets:
            a = torch.randn(rank, d_in, generator=generator, device=device) / d_in ** 0.5
            b = torch.randn(d_out, rank, generator=generator, device=device) * b_std
            modules[name] = LoraModule(a=a, b=b, scale=2.0)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none"}
    return LoraAdapter(modules=modules, config=config)
