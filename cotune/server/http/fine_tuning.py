"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning jobs, translated to TrainingService, on the
same jobs, registry and quotas as gRPC (max_concurrent_jobs: 429).

- `model` the base model's id trains a new adapter, named `suffix` (checked by TrainingService
  as any adapter name); without a suffix, "ft-" and 12 random hex digits (of the
  Idempotency-Key's hash, when the request has one, so that its retries name the same). A
  suffix that names an existing adapter is refused (409): continuing it is asked for by naming
  it as `model`.
- `model` one of the caller's adapters continues it from its newest version (CreateJob's own
  rule); its next versions keep its name, so a different `suffix` is refused.
- `hyperparameters` (or `method.supervised.hyperparameters`): n_epochs -> epochs, batch_size
  -> batch_size, learning_rate_multiplier -> lr = 2e-4 (cotune's default) times it; "auto" or
  absent: cotune's default. A job reports the values it runs with.
- `fine_tuned_model` is the adapter's name once the job has published a version, null before:
  when it is set, it serves. Each checkpoint is a version, `name@vK`, servable at once.
- An `Idempotency-Key` header makes a retry safe, as CreateJobRequest.idempotency_key: the
  same key answers the job the first request created (`extra_headers=` in `openai`).
- Events and checkpoints are the job's stored events (ListJobEvents), newest first; their ids
  carry the job's and the event's number, so `after` needs no lookup.
"""

from __future__ import annotations

import hashlib
import re
import secrets

import grpc
from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cotune.engine.finetune_spec import FinetuneSpec, OptimizerSettings
from cotune.server.http.backend import Backend, metadata
from cotune.server.http.errors import ApiError, from_grpc, invalid, not_found
from cotune.server.http.fields import json_body
from cotune.server.http.listing import collect, limit_of, list_object
from cotune.v1 import adapters_pb2, training_pb2

STATUS = {training_pb2.JOB_STATE_QUEUED: "queued", training_pb2.JOB_STATE_RUNNING: "running",
          training_pb2.JOB_STATE_SUCCEEDED: "succeeded", training_pb2.JOB_STATE_FAILED: "failed",
          training_pb2.JOB_STATE_CANCELLED: "cancelled"}
FINISHED = {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED,
            training_pb2.JOB_STATE_CANCELLED}
DEFAULTS = {f: FinetuneSpec.__dataclass_fields__[f].default for f in ("epochs", "batch_size",
                                                                      "seed")}
DEFAULT_LR = OptimizerSettings.lr
FIELDS = ("model", "training_file", "suffix", "hyperparameters", "method", "seed",
          "validation_file")
HYPERPARAMETERS = {"n_epochs": int, "batch_size": int, "learning_rate_multiplier": float}
MAX_LIST = 100  # OpenAI's largest `limit` of the jobs, events and checkpoints lists
EVENT_TEXT = {"queued": "Fine-tuning job queued", "running": "Fine-tuning job started",
              "succeeded": "Fine-tuning job succeeded", "failed": "Fine-tuning job failed",
              "cancelled": "Fine-tuning job cancelled"}
OPENAI_METRICS = {"eval_loss": "valid_loss"}  # cotune's name -> OpenAI's, where they differ


def job_object(job: training_pb2.Job, base: str) -> dict:
    spec = json_format.MessageToDict(job.hyperparameters)  # numbers come back as floats
    hyperparameters = {
        "n_epochs": int(spec.get("epochs", DEFAULTS["epochs"])),
        "batch_size": int(spec.get("batch_size", DEFAULTS["batch_size"])),
        "learning_rate_multiplier": spec.get("optimizer", {}).get("lr", DEFAULT_LR) / DEFAULT_LR}
    parent = spec.get("parent_version")
    failed = job.state == training_pb2.JOB_STATE_FAILED
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": job.create_time.seconds,
        "model": f"{job.adapter}@v{int(parent)}" if parent else base,
        "fine_tuned_model": job.adapter if job.versions else None,
        "status": STATUS[job.state],
        "finished_at": job.update_time.seconds if job.state in FINISHED else None,
        "hyperparameters": hyperparameters, "training_file": job.training_file or None,
        "validation_file": None, "result_files": [],
        "trained_tokens": job.tokens if job.state in FINISHED else None,
        "error": {"code": "job_failed", "message": job.error, "param": None} if failed else None,
        "seed": int(spec.get("seed", DEFAULTS["seed"])), "organization_id": "cotune",
        "estimated_finish": None, "integrations": None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}}


def event_object(event: training_pb2.JobEvent) -> dict:
    kind, level, kind_of_text = event.WhichOneof("event"), "info", "message"
    if kind == "state":
        state = STATUS[event.state]
        message, data = EVENT_TEXT[state], {"status": state}
    elif kind == "error":
        level, message, data = "error", event.error, {}
    elif kind == "progress":
        p, kind_of_text = event.progress, "metrics"
        message = f"Step {p.step}/{p.total_steps}: training loss={p.loss:.4f}"
        data = {"step": p.step, "total_steps": p.total_steps, "train_loss": p.loss,
                "tokens": p.tokens, "tokens_per_second": p.tokens_per_second}
    elif kind == "evaluation":
        kind_of_text, data = "metrics", _metrics(event.evaluation.step, event.evaluation.metrics)
        message = f"Step {event.evaluation.step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in sorted(data.items()) if k != "step")
    else:
        c = event.checkpoint
        message = f"Checkpoint {c.version} at step {c.step}: servable now"
        data = {"step": c.step, "fine_tuned_model_checkpoint": c.version}
    return {"id": _event_id("ftevent", event.job_id, event.sequence),
            "object": "fine_tuning.job.event", "created_at": event.time.seconds,
            "level": level, "message": message, "type": kind_of_text, "data": data}


def checkpoint_object(event: training_pb2.JobEvent) -> dict:
    c = event.checkpoint
    return {"id": _event_id("ftckpt", event.job_id, event.sequence),
            "object": "fine_tuning.job.checkpoint", "created_at": event.time.seconds,
            "fine_tuned_model_checkpoint": c.version, "fine_tuning_job_id": event.job_id,
            "step_number": c.step, "metrics": _metrics(c.step, c.metrics)}


def routes(backend: Backend) -> list[Route]:
    async def create(request: Request) -> JSONResponse:
        md = metadata(request)
        body = await json_body(request)
        message = await _create_request(request, backend, body,
                                        request.headers.get("idempotency-key", ""))
        try:
            job = await backend.training.CreateJob(message, metadata=md)
        except grpc.RpcError as e:
            # NOT_FOUND here is the file: the adapter was looked up already
            raise from_grpc(e, "training_file" if e.code() == grpc.StatusCode.NOT_FOUND
                            else None) from None
        return JSONResponse(job_object(job, await backend.base_model(metadata(request))))

    async def list_jobs(request: Request) -> JSONResponse:
        jobs, more = await collect(request, backend.training.ListJobs,
                                   training_pb2.ListJobsRequest(), "jobs",
                                   limit_of(request, 20, MAX_LIST),
                                   request.query_params.get("after"))
        base = await backend.base_model(metadata(request))
        return JSONResponse(list_object([job_object(j, base) for j in jobs], more))

    async def get_job(request: Request) -> JSONResponse:
        job = await _job_call(backend.training.GetJob, training_pb2.GetJobRequest, request)
        return JSONResponse(job_object(job, await backend.base_model(metadata(request))))

    async def cancel(request: Request) -> JSONResponse:
        job = await _job_call(backend.training.CancelJob, training_pb2.CancelJobRequest, request)
        return JSONResponse(job_object(job, await backend.base_model(metadata(request))))

    async def events(request: Request, prefix: str, default: int, keep, convert):
        job_id = request.path_params["job_id"]
        after = request.query_params.get("after")
        try:
            found, more = await collect(
                request, backend.training.ListJobEvents,
                training_pb2.ListJobEventsRequest(job_id=job_id), "events",
                limit_of(request, default, MAX_LIST),
                None if after is None else _sequence(after, prefix, job_id), keep)
        except grpc.RpcError as e:
            raise from_grpc(e, "fine_tuning_job_id") from None
        return JSONResponse(list_object([convert(e) for e in found], more))

    async def list_events(request: Request) -> JSONResponse:
        return await events(request, "ftevent", 20, None, event_object)

    async def list_checkpoints(request: Request) -> JSONResponse:
        return await events(request, "ftckpt", 10,
                            lambda e: e.WhichOneof("event") == "checkpoint", checkpoint_object)

    jobs = "/v1/fine_tuning/jobs"
    return [Route(jobs, create, methods=["POST"]),
            Route(jobs, list_jobs, methods=["GET"]),
            Route(jobs + "/{job_id}", get_job, methods=["GET"]),
            Route(jobs + "/{job_id}/cancel", cancel, methods=["POST"]),
            Route(jobs + "/{job_id}/events", list_events, methods=["GET"]),
            Route(jobs + "/{job_id}/checkpoints", list_checkpoints, methods=["GET"])]


async def _create_request(request: Request, backend: Backend, body: dict,
                          idempotency_key: str) -> training_pb2.CreateJobRequest:
    """CreateJob's request for OpenAI's body: the adapter it trains (see the module's
    docstring) and the settings."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise invalid(f"unknown field {', '.join(map(repr, unknown))}; accepted: "
                      f"{', '.join(FIELDS)}", unknown[0])
    model, training_file = _text(body, "model"), _text(body, "training_file")
    suffix = _text(body, "suffix", required=False)
    if body.get("validation_file") is not None:
        raise invalid("validation_file is not supported; leave it unset (cotune holds out "
                      "eval_fraction of the training data on its gRPC API)", "validation_file")
    settings = _hyperparameters(body)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise invalid(f"seed {seed!r} not accepted; accepted: a whole number", "seed")
    base = await backend.base_model(metadata(request))
    if model == base:
        drawn = hashlib.sha256(idempotency_key.encode()).hexdigest()[:12] \
            if idempotency_key else secrets.token_hex(6)
        adapter = suffix or f"ft-{drawn}"
        if suffix is not None and await _adapter_exists(backend, request, suffix, "suffix"):
            raise ApiError(409, f"adapter {suffix!r} exists; to train it further pass "
                           f"model={suffix!r}, or choose another suffix", "conflict_error",
                           "suffix", "already_exists")
    else:
        if not await _adapter_exists(backend, request, model, "model"):
            raise not_found(f"model {model!r} does not exist: it is neither the base model "
                            f"{base!r} nor one of your adapters", "model")
        if suffix not in (None, model):
            raise invalid(f"suffix {suffix!r} not accepted with model {model!r}: a job on an "
                          "adapter publishes its next versions under the adapter's own name; "
                          "leave suffix unset", "suffix")
        adapter = model
    lr = settings.pop("learning_rate_multiplier", None)
    return training_pb2.CreateJobRequest(
        adapter=adapter, training_file=training_file, seed=seed,
        idempotency_key=idempotency_key,
        epochs=settings.get("n_epochs"), batch_size=settings.get("batch_size"),
        optimizer=training_pb2.OptimizerConfig(lr=None if lr is None else lr * DEFAULT_LR))


def _hyperparameters(body: dict) -> dict:
    """The settings given (not "auto") of `hyperparameters` or of the supervised `method`."""
    given = body.get("hyperparameters")
    method = body.get("method")
    if method is not None:
        if not isinstance(method, dict) or method.get("type") != "supervised":
            raise invalid("method not accepted; accepted: {\"type\": \"supervised\", "
                          "\"supervised\": {\"hyperparameters\": {...}}}", "method")
        nested = (method.get("supervised") or {}).get("hyperparameters")
        if nested is not None and given is not None:
            raise invalid("hyperparameters are given twice, at the top and in method; give "
                          "them once", "hyperparameters")
        given = nested if nested is not None else given
    if given is None:
        return {}
    if not isinstance(given, dict) or set(given) - set(HYPERPARAMETERS):
        raise invalid(f"hyperparameters not accepted; accepted: an object of "
                      f"{', '.join(HYPERPARAMETERS)}, each a number or \"auto\"",
                      "hyperparameters")
    settings = {}
    for name, kind in HYPERPARAMETERS.items():
        value = given.get(name, "auto")
        if value == "auto":
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or value <= 0 or not isinstance(value, kind | int):  # 2 is a float too
            raise invalid(f"{name} {value!r} not accepted; accepted: \"auto\" or a positive "
                          f"{'whole number' if kind is int else 'number'}", name)
        settings[name] = value
    return settings


def _text(body: dict, name: str, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise invalid(f"{name} {'is missing' if value is None else 'is not a string'}; "
                      f"accepted: a non-empty string", name)
    return value


async def _adapter_exists(backend: Backend, request: Request, name: str, param: str) -> bool:
    try:
        await backend.adapters.GetAdapter(adapters_pb2.GetAdapterRequest(name=name),
                                          metadata=metadata(request))
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise from_grpc(e, param) from None  # not a valid adapter name, says why
    return True


async def _job_call(rpc, message, request: Request) -> training_pb2.Job:
    try:
        return await rpc(message(id=request.path_params["job_id"]), metadata=metadata(request))
    except grpc.RpcError as e:
        raise from_grpc(e, "fine_tuning_job_id") from None


def _metrics(step: int, metrics) -> dict:
    return {"step": step, **{OPENAI_METRICS.get(k, k): v for k, v in metrics.items()}}


def _event_id(prefix: str, job_id: str, sequence: int) -> str:
    return f"{prefix}-{job_id.removeprefix('job-')}-{sequence}"


def _sequence(after: str, prefix: str, job_id: str) -> int:
    """The event number in `after`, an id this module made for job `job_id`."""
    match = re.fullmatch(re.escape(_event_id(prefix, job_id, 0)[:-1]) + r"(\d{1,18})", after)
    if match is None:
        raise invalid(f"after {after[:80]!r} is not an id of job {job_id[:40]!r}'s list; "
                      "accepted: the id of the last item of the previous page", "after")
    return int(match[1])
