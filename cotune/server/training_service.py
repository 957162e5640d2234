"""TrainingService: the caller's fine-tuning jobs; an admin may list and cancel every
tenant's (all_tenants in ListJobs and CancelJob), no one else may. And the caller's RL
sessions (sessions.py): their operations wait on the engine, with no lock held, up to the
call's deadline."""

from __future__ import annotations

import dataclasses
import queue
from pathlib import Path

import grpc

from cotune.adapters.registry import Registry, Repeated
from cotune.engine.broadcast import END
from cotune.engine.finetune_spec import OptimizerSettings
from cotune.engine.session_spec import Datum, LossSpec
from cotune.server import convert
from cotune.server.errors import RpcError, invalid
from cotune.server.file_service import open_file
from cotune.server.handlers import Gate, rpc
from cotune.server.idempotency import idempotency
from cotune.server.jobs import JobManager, job_state_event
from cotune.server.names import parse_reference
from cotune.server.sessions import SessionManager
from cotune.server.uploads import allowed_path
from cotune.v1 import training_pb2, training_pb2_grpc

_SCALARS = ("warmup_steps", "batch_size", "grad_accumulation", "epochs", "max_steps",
            "max_length", "eval_fraction", "checkpoint_every", "seed", "min_share")


class TrainingService(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, gate: Gate, registry: Registry, jobs: JobManager,
                 allowed_roots: list[Path], max_data_bytes: int, sessions: SessionManager):
        self.gate, self.registry, self.jobs = gate, registry, jobs
        self.allowed_roots, self.max_data_bytes = allowed_roots, max_data_bytes
        self.sessions = sessions

    @rpc()
    def CreateJob(self, request, context, tenant):
        adapter, _ = parse_reference(request.adapter, allow_version=False)
        retry = idempotency(request.idempotency_key, request)
        if retry is not None and (earlier := self.registry.repeated(
                tenant.name, "CreateJob", retry)) is not None:
            return convert.job(earlier)  # a retry: the first call's job, and no other
        try:
            record = self.jobs.create(tenant, adapter, _settings(request),
                                      self._data(request, tenant),
                                      from_scratch=request.from_scratch,
                                      training_file=request.training_file, idempotency=retry)
        except Repeated as repeated:  # the first call with the key committed meanwhile
            record = repeated.earlier
        return convert.job(record)

    @rpc()
    def GetJob(self, request, context, tenant):
        return convert.job(self.registry.get_job(tenant.name, request.id))

    @rpc()
    def ListJobs(self, request, context, tenant):
        size = convert.page_size(request.page_size)
        state = None
        if request.state:
            state = convert.JOB_STATE_NAMES.get(request.state)
            if state is None:
                raise invalid(f"state {request.state} is not a JobState")
        records = self.registry.list_jobs(_whose(tenant, request.all_tenants, "all_tenants"),
                                          state, convert.page_after(request.page_token), size)
        return training_pb2.ListJobsResponse(
            jobs=[convert.job(r) for r in records],
            next_page_token=convert.next_page(records, size, lambda r: r.id))

    @rpc()
    def CancelJob(self, request, context, tenant):
        return convert.job(self.jobs.cancel(_whose(tenant, request.all_tenants, "all_tenants"),
                                            request.id))

    @rpc(held_open=True)
    def WatchJob(self, request, context, tenant):
        record = self.registry.get_job(tenant.name, request.id)  # NotFound for others' jobs
        live = self.jobs.live(record.id)
        events = None if live is None else live.events.subscribe()
        yield job_state_event(self.registry.get_job(tenant.name, record.id))
        if events is None:
            return
        try:
            while context.is_active():
                try:
                    event = events.get(timeout=1.0)
                except queue.Empty:
                    continue
                if event is END:
                    return
                yield event
        finally:
            live.events.unsubscribe(events)

    @rpc()
    def ListJobEvents(self, request, context, tenant):
        size = convert.page_size(request.page_size)
        before = convert.page_after(request.page_token, int, "ListJobEvents")
        records = self.registry.list_job_events(
            _whose(tenant, request.all_tenants, "all_tenants"), request.job_id, before, size)
        return training_pb2.ListJobEventsResponse(
            events=[convert.stored_job_event(r) for r in records],
            next_page_token=convert.next_page(records, size, lambda r: r.sequence))

    # --- RL sessions ---------------------------------------------------------------------------

    @rpc()
    def CreateSession(self, request, context, tenant):
        name, version = parse_reference(request.adapter)
        retry = idempotency(request.idempotency_key, request)
        session = self.sessions.create(
            tenant, name, version, _lora_fields(request.lora), _adamw_fields(request.optimizer),
            seed=request.seed, min_share=request.min_share, idempotency=retry)
        return convert.session(session)

    @rpc()
    def GetSession(self, request, context, tenant):
        return convert.session(self.sessions.get(tenant.name, request.id))

    @rpc()
    def ListSessions(self, request, context, tenant):
        return training_pb2.ListSessionsResponse(
            sessions=[convert.session(s) for s in self.sessions.list(tenant.name)])

    @rpc()
    def CloseSession(self, request, context, tenant):
        return convert.session(self.sessions.close(tenant.name, request.id))

    @rpc()
    def ForwardBackward(self, request, context, tenant):
        examples = [_datum(e) for e in request.examples]
        loss = request.loss
        given = {k: getattr(loss, k) for k in ("clip_low", "clip_high") if loss.HasField(k)}
        spec = LossSpec(name=loss.name or "cross_entropy", **given)  # SpecError first
        with self.sessions.use(tenant.name, request.session_id) as session:
            result = _waited(lambda: session.handle.forward_backward(
                examples, spec, timeout=context.time_remaining()))
        return _forward_response(result)

    @rpc()
    def Forward(self, request, context, tenant):
        examples = [Datum(token_ids=tuple(e.token_ids)) for e in request.examples]
        with self.sessions.use(tenant.name, request.session_id) as session:
            result = _waited(lambda: session.handle.forward(
                examples, timeout=context.time_remaining()))
        return _forward_response(result)

    @rpc()
    def OptimStep(self, request, context, tenant):
        changes = _adamw_fields(request.optimizer)
        with self.sessions.use(tenant.name, request.session_id) as session:
            settings = dataclasses.replace(session.spec.optimizer, **changes)  # SpecError
            result = _waited(lambda: session.handle.optim_step(
                settings, timeout=context.time_remaining()))
        return training_pb2.OptimStepResponse(steps=result.steps,
                                              weights_version=result.weights_version,
                                              grad_norm=result.grad_norm)

    @rpc()
    def SaveVersion(self, request, context, tenant):
        with self.sessions.use(tenant.name, request.session_id) as session:
            record = _waited(lambda: self.sessions.save(session, context.time_remaining()))
        return convert.version(record)

    def _data(self, request, tenant) -> bytes:
        kind = request.WhichOneof("data")
        if kind is None:
            raise invalid("the job has no data; set training_file (a file id), training_data "
                          "(JSONL bytes) or server_path")
        if kind == "training_file":
            with open_file(self.registry, tenant.name, request.training_file) as f:
                return f.read()
        if kind == "server_path":
            if not tenant.admin:
                raise RpcError(grpc.StatusCode.PERMISSION_DENIED,
                               "server_path needs an admin token; send training_data instead")
            path = allowed_path(request.server_path, self.allowed_roots, "data files")
            if path.stat().st_size > self.max_data_bytes:
                raise invalid(f"{request.server_path} exceeds {self.max_data_bytes >> 20} MiB")
            return path.read_bytes()
        if not request.training_data:
            raise invalid("training_data is empty; accepted: JSONL lines of {\"prompt\", "
                          "\"completion\"}, {\"messages\"} or {\"text\"}")
        return request.training_data


def _whose(tenant, every_tenant: bool, field: str) -> str | None:
    """The tenant whose jobs a call reaches: the caller's, or with `every_tenant` (admin
    tokens only) any tenant's (None)."""
    if not every_tenant:
        return tenant.name
    if not tenant.admin:
        raise RpcError(grpc.StatusCode.PERMISSION_DENIED,
                       f"{field} needs an admin token; a tenant reaches only its own jobs "
                       f"(leave {field} unset)")
    return None


def _settings(request) -> dict:
    """The job's settings as FinetuneSpec takes them; unset fields keep its defaults."""
    fields = {name: getattr(request, name) for name in _SCALARS if request.HasField(name)}
    if request.schedule:
        fields["schedule"] = request.schedule
    lora = _lora_fields(request.lora)
    optimizer = {name: getattr(request.optimizer, name) for name in ("lr", "weight_decay")
                 if request.optimizer.HasField(name)}
    if request.optimizer.HasField("max_grad_norm"):
        optimizer["max_grad_norm"] = request.optimizer.max_grad_norm or None
    if lora:
        fields["lora"] = lora
    if optimizer:
        fields["optimizer"] = optimizer
    return fields


def _lora_fields(config) -> dict:
    """A LoraConfig as LoraSettings takes it; unset fields keep its defaults."""
    lora = {name: getattr(config, name) for name in ("rank", "alpha", "dropout")
            if config.HasField(name)}
    if config.rslora:
        lora["rslora"] = True
    if config.dora:
        lora["dora"] = True
    if config.target_modules:
        lora["targets"] = list(config.target_modules)
    return lora


def _adamw_fields(config) -> dict:
    """An AdamWConfig as OptimizerSettings takes it: the fields set (max_grad_norm 0: no
    clipping), a beta given alone paired with the default of the other."""
    fields = {name: getattr(config, name) for name in ("lr", "eps", "weight_decay")
              if config.HasField(name)}
    if config.HasField("max_grad_norm"):
        fields["max_grad_norm"] = config.max_grad_norm or None
    if config.HasField("beta1") or config.HasField("beta2"):
        default = OptimizerSettings().betas
        fields["betas"] = (config.beta1 if config.HasField("beta1") else default[0],
                           config.beta2 if config.HasField("beta2") else default[1])
    return fields


def _datum(example) -> Datum:
    """An Example as the engine takes it: absent logprobs or advantages stay None."""
    return Datum(token_ids=tuple(example.token_ids), weights=tuple(example.weights),
                 logprobs=tuple(example.logprobs.values) if example.HasField("logprobs")
                 else None,
                 advantages=tuple(example.advantages.values) if example.HasField("advantages")
                 else None)


def _waited(operation):
    """`operation`'s result, waited for up to the call's deadline."""
    try:
        return operation()
    except TimeoutError:
        raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                       "the call's deadline passed before the session's operation ended; it "
                       "still runs in the engine, and takes effect there (its gradients, its "
                       "step); give the call a longer deadline") from None


def _forward_response(result) -> training_pb2.ForwardResponse:
    response = training_pb2.ForwardResponse(
        logprobs=[training_pb2.TokenValues(values=lp) for lp in result.logprobs],
        weights_version=result.weights_version)
    if result.loss is not None:
        response.loss = result.loss
    return response
