"""Generation for a mixed batch of requests, each on its own adapter, in shared forward passes.

Every step is one forward pass over a flat batch: first all prompts (prefill), then one new
token per unfinished request (decode). The continuous-batching scheduler and the paged KV
cache of the engine replace this simple loop; its results are the reference they must keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cotune.engine.sampler import sample
from cotune.model.config import ModelConfig
from cotune.model.kv import SequenceKV
from cotune.model.llama import CausalLM, ForwardBatch
from cotune.model.lora_routing import LoraRouting


@dataclass
class GenerationRequest:
    prompt_token_ids: list[int]
    slot: int | None = None  # resident adapter slot, None for the base model
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (an end-of-sequence token) or "length"


def validate_request(request: GenerationRequest, config: ModelConfig) -> None:
    if not request.prompt_token_ids:
        raise ValueError("a request needs a non-empty prompt")
    vocab_size = config.vocab_size
    bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    total = len(request.prompt_token_ids) + request.max_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {len(request.prompt_token_ids)} tokens plus max_tokens "
            f"{request.max_tokens} exceeds the model's context of "
            f"{config.max_position_embeddings} tokens; shorten the prompt or lower max_tokens")
    if request.max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
    if request.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {request.temperature}")


@torch.inference_mode()
def generate(model: CausalLM, requests: list[GenerationRequest],
             stop_token_ids: set[int]) -> list[Completion]:
    """Runs every request together; returns completions in request order."""
    for request in requests:
        validate_request(request, model.config)
    kv = [SequenceKV(model.config.num_layers) for _ in requests]
    generators = [None if r.seed is None else torch.Generator().manual_seed(r.seed)
                  for r in requests]
    outputs: list[list[int]] = [[] for _ in requests]
    finish: list[str | None] = [None] * len(requests)
    active = list(range(len(requests)))
    inputs = [list(r.prompt_token_ids) for r in requests]
    while active:
        seq_lens = [len(inputs[i]) for i in active]
        batch = ForwardBatch(
            token_ids=torch.tensor([t for i in active for t in inputs[i]]),
            seq_lens=seq_lens,
            kv=[kv[i] for i in active],
            lora=LoraRouting.from_sequences(seq_lens, [requests[i].slot for i in active]),
        )
        hidden = model(batch)  # (T, hidden)
        last_rows = torch.tensor(seq_lens).cumsum(0) - 1
        logits = model.logits(hidden[last_rows])  # (active, vocab)
        for row, i in enumerate(active):
            token = sample(logits[row], requests[i].temperature, generators[i])
            outputs[i].append(token)
            inputs[i] = [token]
            if token in stop_token_ids:
                finish[i] = "stop"
            elif len(outputs[i]) >= requests[i].max_tokens:
                finish[i] = "length"
        active = [i for i in active if finish[i] is None]
    return [Completion(out, reason) for out, reason in zip(outputs, finish)]
