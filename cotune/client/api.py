"""The surface `Client` and `AsyncClient` share: connecting, inference and health. Adapters,
files, jobs and tenants are in `namespaces.py`, RL sessions in `sessions.py`. Written once;
see `transport.py` for how one body serves both the sync and the async client."""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cotune.client.generation import generate_request
from cotune.client.namespaces import Adapters, Files, Jobs, Tenants
from cotune.client.sessions import Sessions
from cotune.client.transport import Collect
from cotune.client.types import Completion, Delta, ModelInfo
from cotune.v1 import inference_pb2, inference_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


class ClientBase:
    """A connection to a cotune server, as one tenant (the token's).

    address: "host:port"; default $COTUNE_ADDR, else 127.0.0.1:50051.
    token: the tenant's bearer token; default $COTUNE_TOKEN.
    tls: connect with TLS (implied by root_certificates or client_cert); root_certificates
        PEM of the CA to trust (default: the system's); client_cert (certificate chain PEM,
        private key PEM) for mutual TLS.
    timeout: deadline in seconds of each call that is not a stream (None: none). Streams
        (generate, watch) have none unless their own `timeout` is given.
    retries: more attempts after UNAVAILABLE, with backoff (see `retry.py`).

    Subclasses say which gRPC API (`grpc` or `grpc.aio`) and which transport they use.
    """

    _grpc: ModuleType  # grpc or grpc.aio
    _transport_class: type

    def __init__(self, address: str | None = None, token: str | None = None, *,
                 tls: bool = False, root_certificates: bytes | None = None,
                 client_cert: tuple[bytes, bytes] | None = None,
                 timeout: float | None = 60, retries: int = 3):
        self.address = address or os.environ.get("COTUNE_ADDR") or DEFAULT_ADDRESS
        token = os.environ.get("COTUNE_TOKEN") if token is None else token
        if tls or root_certificates is not None or client_cert is not None:
            chain, key = client_cert or (None, None)
            credentials = grpc.ssl_channel_credentials(root_certificates, key, chain)
            channel = self._grpc.secure_channel(self.address, credentials)
        else:
            channel = self._grpc.insecure_channel(self.address)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._t = self._transport_class(channel, metadata, timeout, retries)
        self._inference = inference_pb2_grpc.InferenceServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self.adapters = Adapters(self._t)
        self.files = Files(self._t)
        self.jobs = Jobs(self._t)
        self.tenants = Tenants(self._t)
        self.sessions = Sessions(self._t)

    def generate(self, prompt: str | Sequence[int], *, adapter: str | None = None,
                 max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, stop: Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, logprobs: int | None = None,
                 ignore_eos: bool = False, request_id: str | None = None,
                 timeout: float | None = None):
        """Streams the generation for `prompt` (text, or token ids) as `Delta`s, on the base
        model or on `adapter` ("name" or "name@vK"). Arguments left None take the server's
        defaults (16 tokens, greedy). Closing the iterator, or breaking out of a loop over it,
        cancels the call, which aborts the request on the server. `timeout`: seconds for the
        whole generation."""
        request = generate_request(
            prompt, adapter=adapter, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
            logprobs=logprobs, ignore_eos=ignore_eos, request_id=request_id)
        return self._t.stream(self._inference.Generate, request, Delta.from_pb, timeout)

    def complete(self, prompt: str | Sequence[int], **options) -> Completion:
        """The whole generation at once: takes the arguments of `generate`."""
        return self._t.fold(self.generate(prompt, **options), Collect(Completion.from_deltas))

    def abort(self, request_id: str) -> bool:
        """Stops one of the tenant's generations; False when none by that id is in flight."""
        return self._t.unary(self._inference.Abort,
                             inference_pb2.AbortRequest(request_id=request_id),
                             lambda response: response.aborted)

    def tokenize(self, text: str | None = None, *, chat: Sequence[dict] | None = None
                 ) -> list[int]:
        """The token ids of `text` as a prompt, or of the conversation `chat` (messages with
        a role and a content) as the model's chat template renders it for generation."""
        if (text is None) == (chat is None):
            raise ValueError("give text or chat, one of them")
        request = inference_pb2.TokenizeRequest(text=text) if chat is None else \
            inference_pb2.TokenizeRequest(chat=inference_pb2.ChatMessages(messages=[
                inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in chat]))
        return self._t.unary(self._inference.Tokenize, request,
                             lambda response: list(response.token_ids))

    def model_info(self) -> ModelInfo:
        return self._t.unary(self._inference.GetModelInfo, inference_pb2.GetModelInfoRequest(),
                             ModelInfo.from_pb)

    def health(self) -> str:
        """"SERVING" or "NOT_SERVING" (draining), by grpc.health.v1; needs no token."""
        return self._t.unary(
            self._health.Check, health_pb2.HealthCheckRequest(),
            lambda response: health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
