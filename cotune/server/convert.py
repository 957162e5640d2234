"""Registry and engine records as wire messages."""

from __future__ import annotations

import json

from google.protobuf import struct_pb2, timestamp_pb2

from cotune.adapters.registry import (
    AdapterRecord,
    FileRecord,
    JobEventRecord,
    JobRecord,
    Quotas,
    TenantRecord,
    TokenRecord,
    VersionRecord,
)
from cotune.server import page_tokens
from cotune.server.errors import invalid
from cotune.server.names import reference
from cotune.server.sessions import LiveSession
from cotune.v1 import adapters_pb2, files_pb2, tenants_pb2, training_pb2

JOB_STATES = {"queued": training_pb2.JOB_STATE_QUEUED, "running": training_pb2.JOB_STATE_RUNNING,
              "succeeded": training_pb2.JOB_STATE_SUCCEEDED,
              "failed": training_pb2.JOB_STATE_FAILED,
              "cancelled": training_pb2.JOB_STATE_CANCELLED}
JOB_STATE_NAMES = {number: name for name, number in JOB_STATES.items()}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def struct(data: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(json.loads(json.dumps(data, default=str)))  # JSON-safe: None, lists, str
    return message


def adapter(record: AdapterRecord) -> adapters_pb2.Adapter:
    return adapters_pb2.Adapter(
        name=record.name, latest_version=record.latest_version,
        version_count=record.version_count, description=record.description,
        labels=record.labels, create_time=timestamp(record.created),
        update_time=timestamp(record.updated))


def version(record: VersionRecord) -> adapters_pb2.AdapterVersion:
    p = record.provenance
    metrics = {k: float(v) for k, v in (p.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    provenance = adapters_pb2.Provenance(
        source=p.get("source", ""), base_fingerprint=p.get("base_fingerprint") or "",
        parent_version=p.get("parent_version") or 0,
        dataset_fingerprint=p.get("dataset_fingerprint") or "",
        hyperparameters=struct(p.get("hyperparameters") or {}), job_id=p.get("job_id") or "",
        metrics=metrics, session_id=p.get("session_id") or "", steps=p.get("steps") or 0,
        parents=[adapters_pb2.MergeParent(adapter=parent["adapter"], weight=parent["weight"])
                 for parent in p.get("parents") or []])
    return adapters_pb2.AdapterVersion(
        name=record.name, version=record.version, rank=record.rank, alpha=record.alpha,
        target_modules=list(record.target_modules), size_bytes=record.size_bytes,
        sha256=record.sha256, provenance=provenance, create_time=timestamp(record.created))


_INT32_MAX = 2**31 - 1


def job(record: JobRecord) -> training_pb2.Job:
    """Never fails on the numbers a record holds: a count past int32 (a job stored before
    specs were bounded) is shown as int32's largest, so that one job does not fail a list."""
    progress = record.progress
    message = training_pb2.Job(
        id=record.id, adapter=record.adapter, state=JOB_STATES[record.state],
        step=min(progress.get("step", 0), _INT32_MAX),
        total_steps=min(progress.get("total_steps", 0), _INT32_MAX),
        tokens=progress.get("tokens", 0),
        versions=[reference(record.adapter, v) for v in record.versions], error=record.error,
        hyperparameters=struct(record.spec), create_time=timestamp(record.created),
        update_time=timestamp(record.updated), owner=record.owner, tenant=record.tenant,
        training_file=record.training_file)
    if progress.get("loss") is not None:
        message.loss = progress["loss"]
    if progress.get("eval_loss") is not None:
        message.eval_loss = progress["eval_loss"]
    return message


def session(live: LiveSession) -> training_pb2.Session:
    spec, handle = live.spec, live.handle
    lora, optimizer = spec.lora, spec.optimizer
    return training_pb2.Session(
        id=live.id, adapter=live.adapter, parent=live.parent,
        state=training_pb2.SESSION_STATE_OPEN if live.open else training_pb2.SESSION_STATE_CLOSED,
        close_reason=live.close_reason, steps=handle.steps,
        weights_version=handle.weights_version,
        lora=training_pb2.LoraConfig(rank=lora.rank, alpha=lora.alpha, rslora=lora.rslora,
                                     target_modules=list(lora.targets), dropout=lora.dropout),
        optimizer=adamw(optimizer), seed=spec.seed,
        versions=[reference(live.adapter, v) for v in live.versions],
        create_time=timestamp(live.created), last_used_time=timestamp(live.last_used),
        idle_timeout_seconds=live.idle_timeout_s, tenant=live.tenant)


def adamw(settings) -> training_pb2.AdamWConfig:
    """OptimizerSettings on the wire, every field set (max_grad_norm 0: no clipping)."""
    beta1, beta2 = settings.betas
    return training_pb2.AdamWConfig(
        lr=settings.lr, beta1=beta1, beta2=beta2, eps=settings.eps,
        weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm or 0.0)


def job_event(job_id: str, time: float, kind: str, data: dict,
              sequence: int = 0) -> training_pb2.JobEvent:
    """The wire event of `kind` with `data` as JobEventRecord has it: one translation for the
    events a watcher hears and those ListJobEvents reads back."""
    message = training_pb2.JobEvent(job_id=job_id, time=timestamp(time), sequence=sequence)
    if kind == "state":
        message.state = JOB_STATES[data["state"]]
    elif kind == "error":
        message.error = data["error"]
    elif kind == "progress":
        message.progress.CopyFrom(training_pb2.Progress(
            step=data["step"], total_steps=data["total_steps"], loss=data["loss"] or 0.0,
            tokens=data["tokens"], tokens_per_second=data["tokens_per_second"]))
    elif kind == "evaluation":
        message.evaluation.CopyFrom(training_pb2.Evaluation(step=data["step"],
                                                            metrics=data["metrics"]))
    else:
        message.checkpoint.CopyFrom(training_pb2.Checkpoint(
            step=data["step"], version=data["version"], metrics=data["metrics"]))
    return message


def stored_job_event(record: JobEventRecord) -> training_pb2.JobEvent:
    return job_event(record.job_id, record.time, record.kind, record.data, record.sequence)


def file(record: FileRecord) -> files_pb2.File:
    return files_pb2.File(id=record.id, filename=record.filename, purpose=record.purpose,
                          size_bytes=record.size_bytes, create_time=timestamp(record.created))


_NO_LIMITS = Quotas()


def quotas(message: tenants_pb2.Quotas, defaults: Quotas = _NO_LIMITS) -> Quotas:
    """The quotas of `message`; a field it leaves unset is that of `defaults` (no limit)."""
    fields = {f: getattr(message if message.HasField(f) else defaults, f)
              for f in Quotas.__dataclass_fields__}
    negative = [f for f, v in fields.items() if v < 0]
    if negative:
        raise invalid(f"quotas {', '.join(negative)} are negative; accepted: 0 (no limit) or "
                      "a positive number")
    return Quotas(**fields)


def tenant(record: TenantRecord, tokens: list[TokenRecord]) -> tenants_pb2.Tenant:
    return tenants_pb2.Tenant(
        name=record.name, admin=record.admin,
        quotas=tenants_pb2.Quotas(**record.quotas.__dict__),
        create_time=timestamp(record.created),
        tokens=[tenants_pb2.TokenInfo(id=t.id, description=t.description,
                                      create_time=timestamp(t.created), revoked=t.revoked)
                for t in tokens])


# Page tokens are opaque to clients: the key to continue after (page_tokens.py).


def page_size(requested: int) -> int:
    if requested < 0 or requested > page_tokens.MAX_PAGE:
        raise invalid(f"page_size {requested} not accepted; accepted: 0 (default "
                      f"{page_tokens.DEFAULT_PAGE}) to {page_tokens.MAX_PAGE}")
    return requested or page_tokens.DEFAULT_PAGE


def page_after(token: str, kind: type = object, method: str = "this list"):
    """The key a page token continues after (None for the first page); a token this server
    did not make, or one of another List call (its key not a `kind`), is refused."""
    if not token:
        return None
    try:
        after = page_tokens.decode(token)
    except ValueError:
        raise invalid("page_token is not one this server gave; pass next_page_token of the "
                      "previous page, or nothing for the first page") from None
    if not isinstance(after, kind):
        raise invalid(f"page_token is not one this server gave for {method}")
    return after


def next_page(items: list, size: int, key) -> str:
    """The token after the last item of a full page; "" when this was the last page."""
    return page_tokens.encode(key(items[-1])) if len(items) >= size else ""
