"""What the SDK returns: frozen dataclasses built from the wire messages (`from_pb`).

Times are timezone-aware UTC datetimes (None when the server left them unset); enums are
lower-case strings ("running", "stop"); protobuf Structs and maps are plain dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from google.protobuf import json_format

from cotune.v1 import inference_pb2, tenants_pb2, training_pb2

JOB_STATES = {training_pb2.JOB_STATE_QUEUED: "queued",
              training_pb2.JOB_STATE_RUNNING: "running",
              training_pb2.JOB_STATE_SUCCEEDED: "succeeded",
              training_pb2.JOB_STATE_FAILED: "failed",
              training_pb2.JOB_STATE_CANCELLED: "cancelled"}
TERMINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})
FINISH_REASONS = {inference_pb2.FINISH_REASON_STOP: "stop",
                  inference_pb2.FINISH_REASON_LENGTH: "length",
                  inference_pb2.FINISH_REASON_ABORT: "abort"}
QUOTA_FIELDS = tuple(f.name for f in tenants_pb2.Quotas.DESCRIPTOR.fields)
SESSION_STATES = {training_pb2.SESSION_STATE_OPEN: "open",
                  training_pb2.SESSION_STATE_CLOSED: "closed"}


def _time(message, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    return getattr(message, field).ToDatetime(tzinfo=timezone.utc)


def _optional(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


def _struct(struct) -> dict:
    return json_format.MessageToDict(struct)


@dataclass(frozen=True)
class Adapter:
    name: str
    latest_version: int
    version_count: int
    description: str
    labels: dict[str, str]
    create_time: datetime | None
    update_time: datetime | None

    @classmethod
    def from_pb(cls, m) -> Adapter:
        return cls(m.name, m.latest_version, m.version_count, m.description, dict(m.labels),
                   _time(m, "create_time"), _time(m, "update_time"))


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable version; `ref` ("name@vK") addresses exactly it."""

    name: str
    version: int
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    sha256: str
    provenance: dict
    create_time: datetime | None

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @classmethod
    def from_pb(cls, m) -> AdapterVersion:
        p = m.provenance
        provenance = {"source": p.source, "base_fingerprint": p.base_fingerprint,
                      "parent_version": p.parent_version or None,
                      "dataset_fingerprint": p.dataset_fingerprint,
                      "hyperparameters": _struct(p.hyperparameters), "job_id": p.job_id,
                      "metrics": dict(p.metrics), "session_id": p.session_id,
                      "steps": p.steps,
                      "parents": [{"adapter": q.adapter, "weight": q.weight}
                                  for q in p.parents]}
        return cls(m.name, m.version, m.rank, m.alpha, tuple(m.target_modules), m.size_bytes,
                   m.sha256, provenance, _time(m, "create_time"))


@dataclass(frozen=True)
class Job:
    id: str
    adapter: str
    state: str  # queued, running, succeeded, failed, cancelled
    step: int
    total_steps: int
    tokens: int
    loss: float | None
    eval_loss: float | None
    versions: tuple[str, ...]  # "name@vK" published so far
    error: str
    hyperparameters: dict
    create_time: datetime | None
    update_time: datetime | None
    owner: str = ""  # the worker that runs it (a router sends its calls there)
    tenant: str = ""  # whose job it is
    training_file: str = ""  # the id of the file it trains on ("": data sent inline)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_JOB_STATES

    @classmethod
    def from_pb(cls, m) -> Job:
        return cls(m.id, m.adapter, JOB_STATES.get(m.state, "unspecified"), m.step,
                   m.total_steps, m.tokens, _optional(m, "loss"), _optional(m, "eval_loss"),
                   tuple(m.versions), m.error, _struct(m.hyperparameters),
                   _time(m, "create_time"), _time(m, "update_time"), m.owner, m.tenant,
                   m.training_file)


@dataclass(frozen=True)
class JobEvent:
    """One event of a watched job. `kind` says which fields are set:
    state: `state`; progress: `step`, `total_steps`, `loss`, `tokens`, `tokens_per_second`;
    evaluation: `step`, `metrics`; checkpoint: `step`, `version`, `metrics`; error: `error`.
    `sequence`: its number among the job's stored events (jobs.events), 0 from jobs.watch."""

    job_id: str
    time: datetime | None
    kind: str  # state, progress, evaluation, checkpoint, error
    state: str | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    tokens: int | None = None
    tokens_per_second: float | None = None
    metrics: dict[str, float] | None = None
    version: str | None = None
    error: str | None = None
    sequence: int = 0

    @classmethod
    def from_pb(cls, m) -> JobEvent:
        kind = m.WhichOneof("event")
        head = dict(job_id=m.job_id, time=_time(m, "time"), kind=kind, sequence=m.sequence)
        if kind == "state":
            return cls(**head, state=JOB_STATES.get(m.state, "unspecified"))
        if kind == "progress":
            p = m.progress
            return cls(**head, step=p.step, total_steps=p.total_steps, loss=p.loss,
                       tokens=p.tokens, tokens_per_second=p.tokens_per_second)
        if kind == "evaluation":
            return cls(**head, step=m.evaluation.step, metrics=dict(m.evaluation.metrics))
        if kind == "checkpoint":
            return cls(**head, step=m.checkpoint.step, version=m.checkpoint.version,
                       metrics=dict(m.checkpoint.metrics))
        return cls(**head, error=m.error)


@dataclass(frozen=True)
class File:
    """An uploaded file; `id` ("file-...") is what jobs.create(training_file=...) takes."""

    id: str
    filename: str
    purpose: str
    size_bytes: int
    create_time: datetime | None

    @classmethod
    def from_pb(cls, m) -> File:
        return cls(m.id, m.filename, m.purpose, m.size_bytes, _time(m, "create_time"))


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # token id -> logprob of the k most likely alternatives

    @classmethod
    def from_pb(cls, m) -> TokenLogprob:
        return cls(m.token_id, m.logprob, {t.token_id: t.logprob for t in m.top})


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float


@dataclass(frozen=True)
class Delta:
    """The tokens and text one message of a generation stream adds. `finish_reason` ("stop",
    "length" or "abort") and `usage` are set on the last one only; `adapter`, the version that
    serves the request ("name@vK", "" for the base model), on the first one only."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    usage: Usage | None
    adapter: str
    logprobs: tuple[TokenLogprob, ...]
    weights_version: int = 0  # sampling from a session: the weights its tokens came from

    @classmethod
    def from_pb(cls, m) -> Delta:
        usage = None
        if m.HasField("usage"):
            usage = Usage(m.usage.prompt_tokens, m.usage.completion_tokens,
                          m.usage.ttft_seconds)
        return cls(m.request_id, tuple(m.token_ids), m.text,
                   FINISH_REASONS.get(m.finish_reason), usage, m.adapter,
                   tuple(TokenLogprob.from_pb(lp) for lp in m.logprobs), m.weights_version)


@dataclass(frozen=True)
class Completion:
    """A whole generation: the deltas of its stream joined."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    adapter: str
    logprobs: tuple[TokenLogprob, ...]
    # sampling from a session: the weights version every token came from (a generation keeps
    # the version it started with); 0 otherwise
    weights_version: int = 0

    @classmethod
    def from_deltas(cls, deltas: list[Delta]) -> Completion:
        usage = next((d.usage for d in reversed(deltas) if d.usage is not None),
                     Usage(0, 0, 0.0))
        return cls(next((d.request_id for d in deltas if d.request_id), ""),
                   "".join(d.text for d in deltas),
                   tuple(t for d in deltas for t in d.token_ids),
                   next((d.finish_reason for d in reversed(deltas) if d.finish_reason), None),
                   usage.prompt_tokens, usage.completion_tokens, usage.ttft_s,
                   next((d.adapter for d in deltas if d.adapter), ""),
                   tuple(lp for d in deltas for lp in d.logprobs),
                   next((d.weights_version for d in deltas if d.weights_version), 0))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    base_fingerprint: str
    vocab_size: int
    max_context: int
    max_rank: int
    lora_targets: tuple[str, ...]
    dtype: str
    device: str
    hidden_size: int
    num_layers: int
    quantization: str | None  # "int8", "int4", or None: the base's projections in dtype

    @classmethod
    def from_pb(cls, m) -> ModelInfo:
        return cls(m.name, m.base_fingerprint, m.vocab_size, m.max_context, m.max_rank,
                   tuple(m.lora_targets), m.dtype, m.device, m.hidden_size, m.num_layers,
                   m.quantization or None)


@dataclass(frozen=True)
class Quotas:
    """A tenant's limits; None is no limit (0 on the wire)."""

    max_adapters: int | None = None
    max_versions_per_adapter: int | None = None
    max_concurrent_jobs: int | None = None
    max_queued_requests: int | None = None
    max_tokens_per_minute: int | None = None
    max_sessions: int | None = None

    @classmethod
    def from_pb(cls, m) -> Quotas:
        return cls(**{f: getattr(m, f) or None for f in QUOTA_FIELDS})

    def to_pb(self) -> tenants_pb2.Quotas:
        return tenants_pb2.Quotas(**{f: getattr(self, f) or 0 for f in QUOTA_FIELDS})


@dataclass(frozen=True)
class TokenInfo:
    id: str
    description: str
    create_time: datetime | None
    revoked: bool

    @classmethod
    def from_pb(cls, m) -> TokenInfo:
        return cls(m.id, m.description, _time(m, "create_time"), m.revoked)


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool
    quotas: Quotas
    create_time: datetime | None
    tokens: tuple[TokenInfo, ...]

    @classmethod
    def from_pb(cls, m) -> Tenant:
        return cls(m.name, m.admin, Quotas.from_pb(m.quotas), _time(m, "create_time"),
                   tuple(TokenInfo.from_pb(t) for t in m.tokens))


@dataclass(frozen=True)
class TenantDeletion:
    """What deleting a tenant removed."""

    adapters_deleted: int
    versions_deleted: int
    jobs_deleted: int
    jobs_cancelled: int  # of the jobs deleted, those that were queued or running
    tokens_deleted: int
    files_deleted: int = 0

    @classmethod
    def from_pb(cls, m) -> TenantDeletion:
        return cls(m.adapters_deleted, m.versions_deleted, m.jobs_deleted, m.jobs_cancelled,
                   m.tokens_deleted, m.files_deleted)


@dataclass(frozen=True)
class IssuedToken:
    """A new token: `token` ("ct_<id>_<secret>") is shown this once; the server keeps a hash."""

    id: str
    token: str

    @classmethod
    def from_pb(cls, m) -> IssuedToken:
        return cls(m.id, m.token)


@dataclass(frozen=True)
class Example:
    """One example of an RL session's forward_backward or forward (a dict of these keys does
    too). Entry t of each per-token list concerns token t, predicted from the tokens before it:
    weights[0] must be 0. `weights`: the loss weight of each token (for importance_sampling and
    ppo, 0 or 1: the mask of the sampled tokens); forward reads token_ids only. `logprobs` (the
    sampler's) and `advantages`: for importance_sampling and ppo, None otherwise."""

    token_ids: Sequence[int]
    weights: Sequence[float] = ()
    logprobs: Sequence[float] | None = None
    advantages: Sequence[float] | None = None

    @classmethod
    def of(cls, example: Example | dict) -> Example:
        if isinstance(example, Example):
            return example
        if not isinstance(example, dict):
            raise TypeError(f"an example is an Example or a dict with its fields, not "
                            f"{type(example).__name__}")
        return cls(**example)

    def to_pb(self) -> training_pb2.Example:
        message = training_pb2.Example(token_ids=self.token_ids, weights=self.weights)
        for name in ("logprobs", "advantages"):
            values = getattr(self, name)
            if values is not None:  # absent differs from empty on the wire
                getattr(message, name).CopyFrom(training_pb2.TokenValues(values=values))
        return message


@dataclass(frozen=True)
class ForwardResult:
    """What forward_backward and forward return: per example, per token the logprob under
    the weights they ran with (0.0 for token 0); the loss summed over the examples (None from
    forward); that weights version."""

    logprobs: tuple[tuple[float, ...], ...]
    loss: float | None
    weights_version: int

    @classmethod
    def from_pb(cls, m) -> ForwardResult:
        return cls(tuple(tuple(lp.values) for lp in m.logprobs), _optional(m, "loss"),
                   m.weights_version)


@dataclass(frozen=True)
class OptimResult:
    """What optim_step returns: the steps taken so far, the weights version that sampling
    uses from now on, the gradients' norm before clipping."""

    steps: int
    weights_version: int
    grad_norm: float

    @classmethod
    def from_pb(cls, m) -> OptimResult:
        return cls(m.steps, m.weights_version, m.grad_norm)


@dataclass(frozen=True)
class SessionInfo:
    """An RL session as the server last reported it. `lora`: rank, alpha, rslora,
    target_modules, dropout; `optimizer`: optim_step's defaults (lr, beta1, beta2, eps,
    weight_decay, max_grad_norm; 0: no clipping)."""

    id: str
    adapter: str
    parent: str  # "name@vK" it continues, "" for new weights
    state: str  # open, closed
    close_reason: str
    steps: int
    weights_version: int
    lora: dict
    optimizer: dict
    seed: int
    versions: tuple[str, ...]  # "name@vK" it saved
    create_time: datetime | None
    last_used_time: datetime | None
    idle_timeout_s: float
    tenant: str

    @classmethod
    def from_pb(cls, m) -> SessionInfo:
        lora = {"rank": m.lora.rank, "alpha": m.lora.alpha, "rslora": m.lora.rslora,
                "target_modules": tuple(m.lora.target_modules), "dropout": m.lora.dropout}
        optimizer = {f: getattr(m.optimizer, f) for f in
                     ("lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm")}
        return cls(m.id, m.adapter, m.parent, SESSION_STATES.get(m.state, "unspecified"),
                   m.close_reason, m.steps, m.weights_version, lora, optimizer, m.seed,
                   tuple(m.versions), _time(m, "create_time"), _time(m, "last_used_time"),
                   m.idle_timeout_seconds, m.tenant)
