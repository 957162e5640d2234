"""`client.sessions`: RL sessions (GRPO, PPO loops the client drives), written once for both
clients. A session holds live LoRA weights on the server:

    session = client.sessions.create("policy", rank=8, lr=1e-4, seed=0)
    completion = session.sample(prompt_token_ids=[1, 2, 3], max_tokens=16, temperature=1.0,
                                logprobs=0)
    result = session.forward_backward([Example(tokens, mask, logprobs=lps, advantages=adv)],
                                      loss="ppo")
    session.optim_step(lr=1e-4)
    version = session.save()  # "policy@vK", servable at once
    session.close()

With `AsyncClient` each method returns an awaitable of the same thing
(`session = await client.sessions.create(...)`, `await session.optim_step()`).
"""

from __future__ import annotations

from collections.abc import Sequence

from cotune.client.generation import generate_request
from cotune.client.namespaces import new_idempotency_key
from cotune.client.transport import Collect, Transport
from cotune.client.types import (
    AdapterVersion,
    Completion,
    Delta,
    Example,
    ForwardResult,
    OptimResult,
    SessionInfo,
)
from cotune.v1 import inference_pb2_grpc, training_pb2, training_pb2_grpc


class Sessions:
    """The tenant's RL sessions on the server this client talks to."""

    def __init__(self, transport: Transport):
        self._t = transport
        self._stub = training_pb2_grpc.TrainingServiceStub(transport.channel)
        self._inference = inference_pb2_grpc.InferenceServiceStub(transport.channel)

    def create(self, adapter: str, *, rank: int | None = None, alpha: float | None = None,
               rslora: bool = False, dora: bool = False,
               targets: Sequence[str] | None = None,
               dropout: float | None = None, lr: float | None = None,
               betas: tuple[float, float] | None = None, eps: float | None = None,
               weight_decay: float | None = None, max_grad_norm: float | None = None,
               seed: int | None = None, min_share: float | None = None,
               idempotency_key: str | None = None) -> Session:
        """Opens a session on `adapter`: a name (new weights drawn from `seed`; what it saves
        becomes the name's next versions) or "name@vK" (that version's weights, rank and
        targets). The optimizer settings are optim_step's defaults. Settings left None take
        the server's defaults (see training.proto). Retried under one idempotency key, so
        that it opens one session."""
        request = training_pb2.CreateSessionRequest(
            adapter=adapter,
            lora=training_pb2.LoraConfig(rank=rank, alpha=alpha, rslora=rslora, dora=dora,
                                         target_modules=targets, dropout=dropout),
            optimizer=_adamw(lr, betas, eps, weight_decay, max_grad_norm), seed=seed,
            min_share=min_share, idempotency_key=idempotency_key or new_idempotency_key())
        return self._t.unary(self._stub.CreateSession, request, self._session)

    def get(self, session_id: str) -> Session:
        """One of the tenant's sessions, open or lately closed (its info says why)."""
        return self._t.unary(self._stub.GetSession,
                             training_pb2.GetSessionRequest(id=session_id), self._session)

    def list(self) -> list[Session]:
        """The tenant's open sessions on this server, oldest first."""
        return self._t.unary(self._stub.ListSessions, training_pb2.ListSessionsRequest(),
                             lambda response: [self._session(m) for m in response.sessions])

    def _session(self, message) -> Session:
        return Session(self, SessionInfo.from_pb(message))


class Session:
    """One RL session. `info` is as the server last reported it (create, get, close);
    the operations return their own results."""

    def __init__(self, sessions: Sessions, info: SessionInfo):
        self._sessions, self._t, self.info = sessions, sessions._t, info

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def adapter(self) -> str:
        return self.info.adapter

    def __repr__(self) -> str:
        return f"Session({self.id!r}, adapter={self.adapter!r})"

    def forward_backward(self, examples: Sequence[Example | dict], loss: str = "cross_entropy",
                         *, clip_low: float | None = None,
                         clip_high: float | None = None) -> ForwardResult:
        """Each example's per-token logprobs under the live weights, and the gradients of
        `loss` (cross_entropy, importance_sampling or ppo; ppo clips the ratio to
        [1 - clip_low, 1 + clip_high]) accumulated until the next optim_step. Bad examples
        raise InvalidArgument and change nothing."""
        request = training_pb2.ForwardBackwardRequest(
            session_id=self.id, examples=_examples(examples),
            loss=training_pb2.Loss(name=loss, clip_low=clip_low, clip_high=clip_high))
        return self._t.unary(self._sessions._stub.ForwardBackward, request,
                             ForwardResult.from_pb)

    def forward(self, examples: Sequence[Example | dict | Sequence[int]]) -> ForwardResult:
        """Each example's per-token logprobs under the live weights; no gradients. An
        example may be its token ids alone."""
        given = [e if isinstance(e, Example | dict) else Example(tuple(e)) for e in examples]
        request = training_pb2.ForwardRequest(session_id=self.id, examples=_examples(given))
        return self._t.unary(self._sessions._stub.Forward, request, ForwardResult.from_pb)

    def optim_step(self, *, lr: float | None = None, betas: tuple[float, float] | None = None,
                   eps: float | None = None, weight_decay: float | None = None,
                   max_grad_norm: float | None = None) -> OptimResult:
        """One AdamW step with the gradients accumulated since the last; settings left None
        are the session's (max_grad_norm 0: no clipping). Generations started after it
        returns sample from the new weights."""
        request = training_pb2.OptimStepRequest(
            session_id=self.id, optimizer=_adamw(lr, betas, eps, weight_decay, max_grad_norm))
        return self._t.unary(self._sessions._stub.OptimStep, request, OptimResult.from_pb)

    def stream(self, prompt: str | Sequence[int] | None = None, *,
               prompt_token_ids: Sequence[int] | None = None, timeout: float | None = None,
               **sampling):
        """Streams a generation from the live weights as `Delta`s (each with the
        weights_version its tokens came from); the sampling arguments of `Client.generate`."""
        if (prompt is None) == (prompt_token_ids is None):
            raise ValueError("give a prompt (text or token ids) or prompt_token_ids, one of them")
        request = generate_request(prompt if prompt is not None else list(prompt_token_ids),
                                   session=self.id, **sampling)
        return self._t.stream(self._sessions._inference.Generate, request, Delta.from_pb,
                              timeout)

    def sample(self, prompt: str | Sequence[int] | None = None, *,
               prompt_token_ids: Sequence[int] | None = None, timeout: float | None = None,
               **sampling) -> Completion:
        """A whole generation from the live weights (max_tokens, temperature, top_p, top_k,
        seed, stop, stop_token_ids, logprobs, ignore_eos, request_id as `Client.generate`);
        its weights_version says which weights every token came from. For the logprobs of
        the sampling distribution (importance_sampling, ppo), sample at temperature 1 with
        logprobs=0."""
        return self._t.fold(self.stream(prompt, prompt_token_ids=prompt_token_ids,
                                        timeout=timeout, **sampling),
                            Collect(Completion.from_deltas))

    def save(self) -> AdapterVersion:
        """Publishes the live weights as the next version of the session's adapter (saving
        unchanged weights again answers the same version)."""
        return self._t.unary(self._sessions._stub.SaveVersion,
                             training_pb2.SaveVersionRequest(session_id=self.id),
                             AdapterVersion.from_pb)

    def refresh(self) -> SessionInfo:
        """The session's info as the server has it now."""
        return self._t.unary(self._sessions._stub.GetSession,
                             training_pb2.GetSessionRequest(id=self.id), self._update)

    def close(self) -> SessionInfo:
        """Closes the session (its live weights go: save first to keep them)."""
        return self._t.unary(self._sessions._stub.CloseSession,
                             training_pb2.CloseSessionRequest(id=self.id), self._update)

    def _update(self, message) -> SessionInfo:
        self.info = SessionInfo.from_pb(message)
        return self.info


def _examples(examples) -> list[training_pb2.Example]:
    if isinstance(examples, Example | dict):
        raise TypeError("examples is a list of examples; wrap the one example in a list")
    return [Example.of(e).to_pb() for e in examples]


def _adamw(lr, betas, eps, weight_decay, max_grad_norm) -> training_pb2.AdamWConfig:
    beta1, beta2 = (None, None) if betas is None else betas
    return training_pb2.AdamWConfig(lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                    weight_decay=weight_decay, max_grad_norm=max_grad_norm)
