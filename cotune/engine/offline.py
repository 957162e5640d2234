"""One process, one base, a batch of requests on many adapters: the embedded engine that
`cotune generate` and `make run` drive."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cotune.adapters.residency import ResidentAdapters
from cotune.engine.generate import GenerationRequest, generate
from cotune.model.default_model import resolve_model_path
from cotune.model.loading import load_model
from cotune.model.tokenizer import load_tokenizer, stop_token_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TextRequest:
    """A request as users write it: text or token ids, and an adapter directory or None."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None


class OfflineEngine:
    def __init__(self, model: str | Path = "default", dtype: str = "float32",
                 max_rank: int = 64, num_slots: int = 16):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
        self.path = resolve_model_path(model)
        self.model = load_model(self.path, dtype=DTYPES[dtype])
        self.tokenizer = load_tokenizer(self.path)
        self.stop_ids = stop_token_ids(self.path, self.tokenizer)
        self.adapters = ResidentAdapters(self.model, num_slots=num_slots, max_rank=max_rank)

    def generate(self, requests: list[TextRequest]) -> list[dict]:
        """Runs all requests in one mixed batch; one {"token_ids", "text"} per request, in order."""
        batch = [self._prepare(r) for r in requests]
        completions = generate(self.model, batch, self.stop_ids)
        return [{"token_ids": c.token_ids,
                 "text": self.tokenizer.decode(c.token_ids, skip_special_tokens=True)}
                for c in completions]

    def _prepare(self, request: TextRequest) -> GenerationRequest:
        if (request.prompt is None) == (request.prompt_token_ids is None):
            raise ValueError("a request needs exactly one of prompt or prompt_token_ids")
        ids = request.prompt_token_ids
        if ids is None:
            ids = self.tokenizer(request.prompt).input_ids
        slot = None
        if request.adapter is not None:
            key = str(Path(request.adapter).resolve())
            slot = self.adapters.load(key, request.adapter)
        return GenerationRequest(list(ids), slot, request.max_tokens, request.temperature,
                                 request.seed)
