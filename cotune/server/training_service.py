"""TrainingService: the caller's fine-tuning jobs; an admin may list and cancel every
tenant's (all_tenants in ListJobs and CancelJob), no one else may."""

from __future__ import annotations

import queue
from pathlib import Path

import grpc

from cotune.adapters.registry import Registry, Repeated
from cotune.engine.broadcast import END
from cotune.server import convert
from cotune.server.errors import RpcError, invalid
from cotune.server.file_service import open_file
from cotune.server.handlers import Gate, rpc
from cotune.server.idempotency import idempotency
from cotune.server.jobs import JobManager, job_state_event
from cotune.server.names import parse_reference
from cotune.server.uploads import allowed_path
from cotune.v1 import training_pb2, training_pb2_grpc

_SCALARS = ("warmup_steps", "batch_size", "grad_accumulation", "epochs", "max_steps",
            "max_length", "eval_fraction", "checkpoint_every", "seed", "min_share")


class TrainingService(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, gate: Gate, registry: Registry, jobs: JobManager,
                 allowed_roots: list[Path], max_data_bytes: int):
        self.gate, self.registry, self.jobs = gate, registry, jobs
        self.allowed_roots, self.max_data_bytes = allowed_roots, max_data_bytes

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
    lora = {name: getattr(request.lora, name) for name in ("rank", "alpha", "dropout")
            if request.lora.HasField(name)}
    if request.lora.rslora:
        lora["rslora"] = True
    if request.lora.target_modules:
        lora["targets"] = list(request.lora.target_modules)
    optimizer = {name: getattr(request.optimizer, name) for name in ("lr", "weight_decay")
                 if request.optimizer.HasField(name)}
    if request.optimizer.HasField("max_grad_norm"):
        optimizer["max_grad_norm"] = request.optimizer.max_grad_norm or None
    if lora:
        fields["lora"] = lora
    if optimizer:
        fields["optimizer"] = optimizer
    return fields
