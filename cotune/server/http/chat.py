"""`POST /v1/chat/completions`: OpenAI's chat completions. The messages go to Generate as its
chat input: the server renders them with the model's own chat template."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.routing import Route

from cotune.server.http import generation
from cotune.server.http.backend import Backend
from cotune.server.http.errors import invalid
from cotune.server.http.fields import (
    boolean,
    check_known,
    integer,
    json_body,
    optional,
    text,
    wrong,
)
from cotune.v1 import inference_pb2

ACCEPTED = generation.FIELDS | {"messages", "max_tokens", "max_completion_tokens", "logprobs",
                                "top_logprobs"}
NEUTRAL = generation.NEUTRAL_FIELDS | {"tools", "tool_choice", "functions", "function_call",
                                       "response_format"}
CONTENT_FORMS = 'a string, or an array of {"type": "text", "text": ...} parts'


UP_TO_THE_CONTEXT = 0  # SamplingParams.max_tokens 0: what the context leaves after the prompt


def routes(backend: Backend) -> list[Route]:
    async def create(request: Request):
        body = await json_body(request)
        check_known(body, ACCEPTED, NEUTRAL, "POST /v1/chat/completions")
        params = generation.read_params(body, _max_tokens(body), _logprobs(body))
        chat = inference_pb2.GenerateRequest(chat=_messages(body.get("messages")))
        return await generation.respond(request, backend, params, [chat],
                                        Chat(params.sampling.HasField("logprobs")))

    return [Route("/v1/chat/completions", create, methods=["POST"])]


def _max_tokens(body: dict) -> int:
    """max_completion_tokens, or max_tokens (its older name); unset, as OpenAI's chat: as many
    as the model's context leaves after the prompt (0, for Generate)."""
    new, old = (optional(body, name, integer) for name in ("max_completion_tokens", "max_tokens"))
    if new is not None and old is not None and new != old:
        raise invalid(f"max_completion_tokens {new} and max_tokens {old} differ; accepted: one "
                      "of them (max_tokens is its older name)", "max_tokens")
    value = old if new is None else new
    if value is None:
        return UP_TO_THE_CONTEXT
    if value < 1:
        raise invalid(f"max_completion_tokens {value} is not accepted; accepted: 1 or more, or "
                      "none for as many as the model's context leaves", "max_completion_tokens")
    return value


def _logprobs(body: dict) -> int | None:
    """The number of alternatives per token to ask for, None for no logprobs."""
    wanted = optional(body, "logprobs", boolean)
    top = optional(body, "top_logprobs", integer)
    if top is not None and not wanted:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def _messages(messages) -> inference_pb2.ChatMessages:
    if messages is None:
        raise invalid("messages is missing; accepted: an array of {role, content} messages",
                      "messages")
    if not isinstance(messages, list):
        raise wrong("messages", messages, "an array of {role, content} messages")
    return inference_pb2.ChatMessages(messages=[_message(m, f"messages[{i}]")
                                                for i, m in enumerate(messages)])


def _message(message, name: str) -> inference_pb2.ChatMessage:
    if not isinstance(message, dict):
        raise wrong(name, message, "an object with a role and a content")
    unknown = sorted(set(message) - {"role", "content"})
    if unknown:
        raise invalid(f"{name} has fields {unknown} this server does not support (no tools or "
                      "names); accepted: role, content", name)
    role = text(message.get("role"), f"{name}.role")
    return inference_pb2.ChatMessage(role=role, content=_content(message.get("content"),
                                                                 f"{name}.content"))


def _content(content, name: str) -> str:
    """A string, or the text parts joined (the model reads text only)."""
    if isinstance(content, str):
        return text(content, name)
    if not isinstance(content, list):
        raise wrong(name, content, CONTENT_FORMS)
    texts = []
    for k, part in enumerate(content):
        where = f"{name}[{k}]"
        if not isinstance(part, dict):
            raise wrong(where, part, CONTENT_FORMS)
        if part.get("type") != "text":
            raise invalid(f"{where} is a {str(part.get('type'))[:40]!r} part; accepted: text "
                          "parts only, this server's models read text", where)
        texts.append(text(part.get("text"), f"{where}.text"))
    return "".join(texts)


@dataclass
class Chat:
    """The objects of a chat completion (generation.Shape)."""

    logprobs: bool  # asked for: `logprobs` is an object, else null
    prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def choice(self, choice: generation.Choice) -> dict:
        return {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": self._logprobs(choice.logprobs),
                "finish_reason": choice.finish_reason}

    def delta(self, choice: generation.Choice, response) -> dict:
        delta = {"content": response.text}
        if not choice.started:  # the role on each choice's first chunk, as OpenAI's
            delta = {"role": "assistant", **delta}
        return {"index": choice.index, "delta": delta,
                "logprobs": self._logprobs(response.logprobs),
                "finish_reason": generation.finish_reason(response)}

    def _logprobs(self, entries) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{**_token(e), "top_logprobs": [_token(t) for t in e.top]}
                            for e in entries], "refusal": None}


def _token(entry) -> dict:
    # `bytes` are the UTF-8 of the token's text; a token that is a part of a character has no
    # text of its own (it decodes as U+FFFD), so its bytes are not known here: null.
    known = "\ufffd" not in entry.token
    return {"token": entry.token, "logprob": entry.logprob,
            "bytes": list(entry.token.encode()) if known else None}
