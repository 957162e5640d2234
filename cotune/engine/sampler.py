"""Choosing the next token from a row of logits."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """logits (vocab,) float32 -> a token id; temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
