"""`POST /v1/completions`: OpenAI's text completions. Each prompt (a string or token ids, one
or several) runs as `n` Generate calls."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.routing import Route

from cotune.server.http import generation
from cotune.server.http.backend import Backend
from cotune.server.http.errors import invalid
from cotune.server.http.fields import check_known, integer, json_body, optional, text, wrong
from cotune.v1 import inference_pb2

ACCEPTED = generation.FIELDS | {"prompt", "max_tokens", "logprobs"}
NEUTRAL = generation.NEUTRAL_FIELDS | {"echo", "best_of", "suffix"}
PROMPT_FORMS = "a string, an array of strings, an array of token ids, or an array of those"


def routes(backend: Backend) -> list[Route]:
    async def create(request: Request):
        body = await json_body(request)
        check_known(body, ACCEPTED, NEUTRAL, "POST /v1/completions")
        logprobs = optional(body, "logprobs", integer)
        params = generation.read_params(body, optional(body, "max_tokens", integer), logprobs)
        return await generation.respond(request, backend, params, _inputs(body.get("prompt")),
                                        Completions(logprobs is not None))

    return [Route("/v1/completions", create, methods=["POST"])]


def _inputs(prompt) -> list[inference_pb2.GenerateRequest]:
    if prompt is None:
        raise invalid(f"prompt is missing; accepted: {PROMPT_FORMS}", "prompt")
    if isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
        return [_input(prompt, "prompt")]  # one prompt as token ids
    if isinstance(prompt, list):
        if not prompt:
            raise invalid(f"prompt is an empty array; accepted: {PROMPT_FORMS}", "prompt")
        return [_input(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [_input(prompt, "prompt")]


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _input(prompt, name: str) -> inference_pb2.GenerateRequest:
    if isinstance(prompt, str):
        return inference_pb2.GenerateRequest(prompt=text(prompt, name))
    if isinstance(prompt, list):
        ids = [integer(t, f"{name}[{k}]") for k, t in enumerate(prompt)]
        return inference_pb2.GenerateRequest(prompt_token_ids=inference_pb2.TokenIds(ids=ids))
    raise wrong(name, prompt, PROMPT_FORMS)


@dataclass
class Completions:
    """The objects of a completion (generation.Shape)."""

    logprobs: bool  # asked for: `logprobs` is an object, else null
    prefix = "cmpl"
    object = chunk_object = "text_completion"

    def choice(self, choice: generation.Choice) -> dict:
        return {"index": choice.index, "text": choice.text,
                "logprobs": self._logprobs(choice.logprobs, 0),
                "finish_reason": choice.finish_reason}

    def delta(self, choice: generation.Choice, response) -> dict:
        return {"index": choice.index, "text": response.text,
                "logprobs": self._logprobs(response.logprobs, len(choice.text)),
                "finish_reason": generation.finish_reason(response)}

    def _logprobs(self, entries, offset: int) -> dict | None:
        """OpenAI's legacy form; `offset`: where the first token's text starts in the
        choice's text."""
        if not self.logprobs:
            return None
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.token)
        return {"tokens": [e.token for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
                "text_offset": offsets}
