"""InferenceService: generation streamed from the shared runtime. A request runs on the
caller's own adapter versions (or RL sessions' live weights) only; its id is scoped to the
caller's tenant. A chat input is rendered here by the model's own chat template, so that gRPC
and HTTP callers get the same."""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import grpc

from cotune.adapters.registry import Registry, TenantRecord
from cotune.engine.runtime import Request, Runtime
from cotune.server.admission import Admission, Rejected
from cotune.server.errors import RpcError, invalid, status_of
from cotune.server.handlers import Gate, rpc
from cotune.server.metrics import Metrics, protocol_of
from cotune.server.names import parse_reference, reference, runtime_key
from cotune.server.sessions import SessionManager
from cotune.v1 import inference_pb2, inference_pb2_grpc

FINISH = {"stop": inference_pb2.FINISH_REASON_STOP, "length": inference_pb2.FINISH_REASON_LENGTH,
          "abort": inference_pb2.FINISH_REASON_ABORT}
MAX_TEXT_BYTES = 1 << 20
MAX_REQUEST_ID = 256  # characters: every response echoes it
CHAT_ROLES = ("system", "user", "assistant")  # as the training data's messages form


class InferenceService(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, gate: Gate, registry: Registry, runtime: Runtime, admission: Admission,
                 model_info: inference_pb2.ModelInfo, metrics: Metrics, max_logprobs: int,
                 sessions: SessionManager | None = None):
        self.gate, self.registry, self.runtime = gate, registry, runtime
        self.admission, self.model_info, self.metrics = admission, model_info, metrics
        self.max_logprobs, self.sessions = max_logprobs, sessions
        self._in_flight: set[str] = set()  # engine ids: "<tenant>/<request id>"
        self._lock = threading.Lock()

    @rpc()
    def Generate(self, request, context, tenant):
        label = self.metrics.adapter_label(tenant.name, self._adapter_name(tenant, request))
        protocol = protocol_of(context)
        status = grpc.StatusCode.OK
        try:
            yield from self._generate(request, context, tenant, label, protocol)
            if not context.is_active():  # the stream ended because the call did
                status = _gone(context)
        except GeneratorExit:
            status = _gone(context)
            raise
        except Exception as e:
            if isinstance(e, Rejected):
                self.metrics.rejections.labels(tenant.name, e.reason, protocol).inc()
            known = status_of(e)
            status = grpc.StatusCode.INTERNAL if known is None else known[0]
            raise
        finally:
            self.metrics.requests.labels(tenant.name, label, status.name, protocol).inc()

    def _generate(self, request, context, tenant: TenantRecord, label: str, protocol: str):
        _check_request_id(request.request_id)
        prompt_ids = self._prompt_ids(request)
        if request.session:
            with self._session(tenant, request) as session:
                engine_request = _engine_request(request, prompt_ids, None, tenant.name)
                engine_request.session = session.handle
                yield from self._run(request, context, tenant, label, protocol, prompt_ids,
                                     engine_request, "")
            return
        served, adapter = self._adapter(tenant, request.adapter)
        engine_request = _engine_request(request, prompt_ids, adapter, tenant.name)
        yield from self._run(request, context, tenant, label, protocol, prompt_ids,
                             engine_request, served)

    def _run(self, request, context, tenant: TenantRecord, label: str, protocol: str,
             prompt_ids: list[int], engine_request: Request, served: str):
        if request.sampling.HasField("max_tokens") and request.sampling.max_tokens <= 0:
            engine_request.max_tokens = self._context_left(len(prompt_ids),
                                                           request.sampling.max_tokens)
        self._check_fits(engine_request)  # refused as bad input, not as load, and before quota
        engine_id = f"{tenant.name}/{request.request_id or uuid.uuid4().hex}"
        engine_request.request_id = engine_id
        m = self.metrics
        with self.admission.request(tenant, len(prompt_ids)), self._claim(engine_id), \
                _in_flight(m.in_flight.labels(tenant.name, protocol)):
            m.prompt_tokens.labels(tenant.name, label, protocol).inc(len(prompt_ids))
            # A cancelled call or a passed deadline aborts the request in the engine at once.
            context.add_callback(lambda: self.runtime.abort(engine_id))
            start = last = time.monotonic()
            ttft, generated = None, 0
            for delta in self.runtime.stream(engine_request):
                now, count = time.monotonic(), len(delta.token_ids)
                if count:
                    gaps, gap = count, (now - last) / count  # delivered together: shared
                    if ttft is None:
                        ttft = now - start
                        m.ttft.labels(tenant.name, protocol).observe(ttft)
                        gaps, gap = count - 1, 0.0  # those that came with the first token
                    for _ in range(gaps):
                        m.inter_token.labels(tenant.name, protocol).observe(gap)
                    last = now
                generated += count
                m.generated_tokens.labels(tenant.name, label, protocol).inc(count)
                self.admission.count_tokens(tenant.name, count)
                response = inference_pb2.GenerateResponse(
                    request_id=engine_id.split("/", 1)[1], token_ids=delta.token_ids,
                    text=delta.text,
                    logprobs=[self._logprob(lp) for lp in delta.logprobs if lp],
                    adapter=served, weights_version=delta.weights_version or 0)
                served = ""  # named on the first message only
                if delta.finish_reason is not None:
                    m.e2e.labels(tenant.name, protocol).observe(now - start)
                    response.finish_reason = FINISH[delta.finish_reason]
                    response.usage.CopyFrom(inference_pb2.Usage(
                        prompt_tokens=len(prompt_ids), completion_tokens=generated,
                        ttft_seconds=ttft or 0.0))
                yield response

    @rpc()
    def Abort(self, request, context, tenant):
        if not request.request_id:
            raise invalid("request_id is empty; give the id of one of your requests")
        aborted = self.runtime.abort(f"{tenant.name}/{request.request_id}")
        return inference_pb2.AbortResponse(aborted=aborted)

    @rpc()
    def Tokenize(self, request, context, tenant):
        if request.WhichOneof("input") == "chat":
            return inference_pb2.TokenizeResponse(token_ids=self._chat_ids(request.chat.messages))
        if len(request.text.encode()) > MAX_TEXT_BYTES:
            raise invalid(f"text exceeds {MAX_TEXT_BYTES >> 20} MiB")
        ids = self.runtime.tokenizer(request.text).input_ids  # as Generate feeds a prompt
        return inference_pb2.TokenizeResponse(token_ids=ids)

    @rpc()
    def GetModelInfo(self, request, context, tenant):
        return self.model_info

    def _prompt_ids(self, request) -> list[int]:
        kind = request.WhichOneof("input")
        if kind is None:
            raise invalid("the request has no input; set prompt, prompt_token_ids or chat")
        if kind == "chat":
            return self._chat_ids(request.chat.messages)
        if kind == "prompt":
            if not request.prompt:
                raise invalid("prompt is empty")
            if len(request.prompt.encode()) > MAX_TEXT_BYTES:
                raise invalid(f"prompt exceeds {MAX_TEXT_BYTES >> 20} MiB")
            return self.runtime.tokenizer(request.prompt).input_ids
        ids = list(request.prompt_token_ids.ids)
        vocab = self.model_info.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if not ids or bad is not None:
            raise invalid(f"prompt_token_ids must be a non-empty list of ids in [0, {vocab}); "
                          f"got {'an empty list' if not ids else bad}")
        return ids

    def _chat_ids(self, messages) -> list[int]:
        """The conversation as the model's chat template renders it, the assistant's turn
        opened."""
        if not messages:
            raise invalid("chat has no messages; accepted: one or more messages with a role "
                          f"({', '.join(CHAT_ROLES)}) and a content")
        for i, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                raise invalid(f"chat.messages[{i}].role is {message.role[:40]!r}; accepted: "
                              f"{', '.join(CHAT_ROLES)}")
        if sum(len(m.content.encode()) for m in messages) > MAX_TEXT_BYTES:
            raise invalid(f"the chat's contents exceed {MAX_TEXT_BYTES >> 20} MiB")
        tokenizer = self.runtime.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise invalid(f"the model {self.model_info.name!r} has no chat template; send a "
                          "prompt (text or token ids) instead")
        try:
            text = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages], tokenize=False,
                add_generation_prompt=True)
        except Exception as e:  # the template's own checks (e.g. roles must alternate)
            raise invalid(f"the model's chat template rejects this conversation: {e}") from None
        # The template writes the special tokens itself (a BOS among them, where it has one).
        return tokenizer(text, add_special_tokens=False).input_ids

    def _logprob(self, lp) -> inference_pb2.TokenLogprob:
        """`lp` with each token's text, so that callers need no tokenizer of their own."""
        text = self.runtime.tokenizer.decode
        return inference_pb2.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob, token=text([lp.token_id]),
            top=[inference_pb2.TopLogprob(token_id=t, logprob=p, token=text([t]))
                 for t, p in lp.top])

    def _check_fits(self, request: Request) -> None:
        """The checks the engine would make inside its step, made here: a request it refused
        there would fail the engine for every caller."""
        params = request.sampling_params()  # SamplingError (INVALID_ARGUMENT) when invalid
        vocab, context = self.model_info.vocab_size, self.model_info.max_context
        limit = min(vocab, self.max_logprobs)
        if params.logprobs is not None and params.logprobs > limit:
            raise invalid(f"logprobs {params.logprobs} asks for more alternatives than this "
                          f"server gives; accepted: 0 to {limit} (--max-logprobs)")
        total = len(request.prompt_token_ids) + params.max_tokens
        if total > context:
            raise invalid(f"prompt of {len(request.prompt_token_ids)} tokens plus max_tokens "
                          f"{params.max_tokens} exceeds the model's context of {context} "
                          "tokens; shorten the prompt or lower max_tokens")

    def _context_left(self, prompt_tokens: int, max_tokens: int) -> int:
        """max_tokens 0: as many tokens as the model's context leaves after the prompt."""
        if max_tokens < 0:
            raise invalid(f"max_tokens {max_tokens} not accepted; accepted: 1 or more, or 0 "
                          "for as many as the model's context leaves after the prompt")
        left = self.model_info.max_context - prompt_tokens
        if left < 1:
            raise invalid(f"the prompt of {prompt_tokens} tokens fills the model's context of "
                          f"{self.model_info.max_context} tokens; no room is left to generate "
                          "in; shorten the prompt")
        return left

    def _session(self, tenant: TenantRecord, request):
        """The caller's open session the request samples from, busy while it streams."""
        if request.adapter:
            raise invalid("adapter and session are both set; a request samples from an "
                          "adapter version or from a session's live weights, one of them")
        if self.sessions is None:
            raise RpcError(grpc.StatusCode.UNIMPLEMENTED, "this server has no RL sessions")
        return self.sessions.use(tenant.name, request.session)

    def _adapter_name(self, tenant: TenantRecord, request) -> str:
        """The adapter the request runs on, as its metrics name it ("" for the base)."""
        if not request.session:
            return request.adapter.split("@", 1)[0]
        try:
            return self.sessions.get(tenant.name, request.session).adapter
        except Exception:  # noqa: BLE001 - the call itself says what is wrong with it
            return ""

    def _adapter(self, tenant: TenantRecord, text: str) -> tuple[str, tuple[str, Path] | None]:
        """(the version served as "name@vK", its (runtime key, PEFT directory)) or ("", None)."""
        if not text:
            return "", None
        name, version = parse_reference(text)
        record = self.registry.get_version(tenant.name, name, version)
        return reference(name, record.version), (runtime_key(tenant.name, name, record.version),
                                                 self.registry.version_dir(record))

    @contextmanager
    def _claim(self, engine_id: str):
        """Holds the request id while it runs: ids are unique among in-flight requests."""
        with self._lock:
            if engine_id in self._in_flight:
                raise RpcError(grpc.StatusCode.ALREADY_EXISTS,
                               f"request {engine_id.split('/', 1)[1]!r} is already in flight; "
                               "use a new request_id")
            self._in_flight.add(engine_id)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight.discard(engine_id)


def _check_request_id(text: str) -> None:
    if len(text) > MAX_REQUEST_ID or not text.isprintable():
        raise invalid(f"request_id {text[:40]!r} ({len(text)} characters) not accepted; "
                      f"accepted: at most {MAX_REQUEST_ID} printable characters, or none for "
                      "one the server picks")


def _gone(context) -> grpc.StatusCode:
    """How a call that ended from the client's side ended."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= 0
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


@contextmanager
def _in_flight(gauge):
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def _engine_request(request, prompt_ids: list[int], adapter: tuple[str, Path] | None,
                    tenant: str) -> Request:
    s = request.sampling
    fields = {name: getattr(s, name) for name in
              ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs")
              if s.HasField(name)}
    key, path = adapter or (None, None)
    return Request(prompt_token_ids=prompt_ids, adapter=key, adapter_path=path, stop=list(s.stop),
                   stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                   tenant=tenant, **fields)
