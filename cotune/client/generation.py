"""The GenerateRequest of a generation: from `ClientBase.generate` (the base model or an
adapter) and from `Session.sample` (an RL session's live weights)."""

from __future__ import annotations

from collections.abc import Sequence

from cotune.v1 import inference_pb2


def generate_request(prompt: str | Sequence[int], *, adapter: str | None = None,
                     session: str | None = None, max_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     top_k: int | None = None, seed: int | None = None,
                     stop: Sequence[str] | None = None,
                     stop_token_ids: Sequence[int] | None = None, logprobs: int | None = None,
                     ignore_eos: bool = False,
                     request_id: str | None = None) -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed, stop=stop, stop_token_ids=stop_token_ids, logprobs=logprobs,
        ignore_eos=ignore_eos)
    given = ({"prompt": prompt} if isinstance(prompt, str) else
             {"prompt_token_ids": inference_pb2.TokenIds(ids=prompt)})
    return inference_pb2.GenerateRequest(**given, adapter=adapter, session=session,
                                         sampling=sampling, request_id=request_id)
