"""`client.adapters`, `client.files`, `client.jobs` and `client.tenants`: written once for both
clients.

With `Client` the methods return values and iterators; with `AsyncClient` the same methods
return awaitables (`await client.adapters.get(...)`) and async iterators
(`async for a in client.adapters.list()`). See `transport.py`.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from cotune.client.files import ExportWriter, file_upload_requests, upload_requests
from cotune.client.transport import Collect, Transport, UntilDone
from cotune.client.types import (
    JOB_STATES,
    Adapter,
    AdapterVersion,
    File,
    IssuedToken,
    Job,
    JobEvent,
    Quotas,
    Tenant,
    TenantDeletion,
)
from cotune.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    files_pb2,
    files_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

_JOB_STATE_NUMBERS = {name: number for number, name in JOB_STATES.items()}


def new_idempotency_key() -> str:
    """A key for one creating call and its retries."""
    return uuid.uuid4().hex


class Adapters:
    """The tenant's adapters. A name addresses the newest version; "name@vK" (or "name@K")
    one version."""

    def __init__(self, transport: Transport):
        self._t = transport
        self._stub = adapters_pb2_grpc.AdapterServiceStub(transport.channel)

    def create(self, name: str, path: str | os.PathLike, *, description: str = "",
               labels: dict[str, str] | None = None,
               idempotency_key: str | None = None) -> AdapterVersion:
        """Uploads a PEFT directory (adapter_config.json + adapter_model.safetensors; `path` is
        the directory or one of the two files) as the next version of `name`, creating the
        adapter when it is new. Retried (after a lost reply too) under one idempotency key, so
        that it publishes one version: a fresh key per call, or `idempotency_key` to retry
        across processes."""
        header = adapters_pb2.CreateAdapterHeader(
            name=name, description=description, labels=labels,
            idempotency_key=idempotency_key or new_idempotency_key())
        return self._t.upload(self._stub.CreateAdapter, upload_requests(header, path),
                              AdapterVersion.from_pb)

    def create_from_server_path(self, name: str, server_path: str, *, description: str = "",
                                labels: dict[str, str] | None = None,
                                idempotency_key: str | None = None) -> AdapterVersion:
        """Publishes a PEFT directory that is already on the server, under a root the server
        allows (--allow-path); admin tokens only. Retried as `create`."""
        header = adapters_pb2.CreateAdapterHeader(
            name=name, description=description, labels=labels, server_path=server_path,
            idempotency_key=idempotency_key or new_idempotency_key())
        return self._t.upload(self._stub.CreateAdapter,
                              lambda: iter([adapters_pb2.CreateAdapterRequest(header=header)]),
                              AdapterVersion.from_pb)

    def merge(self, name: str, parents: Mapping[str, float] | Sequence[tuple[str, float]], *,
              method: str, density: float | None = None,
              majority_sign_method: str | None = None, svd_rank: int | None = None,
              seed: int = 0, description: str = "", labels: dict[str, str] | None = None,
              idempotency_key: str | None = None) -> AdapterVersion:
        """Publishes the next version of `name` (creating the adapter when it is new) as the
        merge of weighted versions of the tenant's adapters, as PEFT's add_weighted_adapter
        makes it: `parents` maps "name@vK" (or "name", its newest) to its weight, e.g.
        {"a@v2": 0.7, "b@v1": 0.3}. `method`: linear, cat, svd, ties, ties_svd, dare_linear,
        dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune or magnitude_prune_svd;
        `density` (the share of entries kept, in (0, 1]) for those that prune,
        `majority_sign_method` ("total" or "frequency") for the ties ones, `svd_rank` for the
        svd ones, `seed` for the dare ones' random masks. The version's provenance names the
        parents, their weights and the method. Retried as `create`."""
        pairs = parents.items() if isinstance(parents, Mapping) else parents
        request = adapters_pb2.MergeAdaptersRequest(
            name=name, parents=[adapters_pb2.MergeParent(adapter=ref, weight=weight)
                                for ref, weight in pairs],
            method=method, density=density or 0.0,
            majority_sign_method=majority_sign_method or "", svd_rank=svd_rank or 0,
            seed=seed, description=description, labels=labels,
            idempotency_key=idempotency_key or new_idempotency_key())
        return self._t.unary(self._stub.MergeAdapters, request, AdapterVersion.from_pb)

    def get(self, name: str) -> Adapter:
        return self._t.unary(self._stub.GetAdapter, adapters_pb2.GetAdapterRequest(name=name),
                             Adapter.from_pb)

    def list(self, name_prefix: str = "", labels: dict[str, str] | None = None,
             page_size: int = 0):
        """Every adapter whose name starts with `name_prefix` and that has all `labels`, over
        as many pages as there are (`page_size`: adapters a call; 0: the server's default)."""
        request = adapters_pb2.ListAdaptersRequest(name_prefix=name_prefix, labels=labels,
                                                   page_size=page_size)
        return self._t.paginate(self._stub.ListAdapters, request, "adapters", Adapter.from_pb)

    def versions(self, name: str, page_size: int = 0):
        """Every version of adapter `name`, oldest first."""
        request = adapters_pb2.ListVersionsRequest(name=name, page_size=page_size)
        return self._t.paginate(self._stub.ListVersions, request, "versions",
                                AdapterVersion.from_pb)

    def delete(self, name: str) -> int:
        """Deletes the adapter with every version ("name") or one version ("name@vK");
        returns how many versions went."""
        return self._t.unary(self._stub.DeleteAdapter,
                             adapters_pb2.DeleteAdapterRequest(name=name),
                             lambda response: response.versions_deleted)

    def export(self, name: str, dest: str | os.PathLike) -> Path:
        """Downloads a version's PEFT files into the new directory `dest` (refused when it
        exists), which appears only once both files are whole."""
        writer = ExportWriter(dest)
        stream = self._t.stream(self._stub.ExportAdapter,
                                adapters_pb2.ExportAdapterRequest(name=name),
                                lambda chunk: chunk, self._t.timeout)
        return self._t.fold(stream, writer)


class Files:
    """The tenant's uploaded files, for fine-tuning jobs (jobs.create(training_file=...))."""

    def __init__(self, transport: Transport):
        self._t = transport
        self._stub = files_pb2_grpc.FileServiceStub(transport.channel)

    def upload(self, data: str | os.PathLike | bytes, *, purpose: str = "fine-tune",
               filename: str | None = None) -> File:
        """Uploads a JSONL file (its path or its bytes) of lines {"prompt","completion"},
        {"messages"} or {"text"}; the server checks every line (InvalidArgument names the
        first bad one) before it keeps the file."""
        return self._t.upload(self._stub.UploadFile,
                              file_upload_requests(data, purpose, filename), File.from_pb)

    def get(self, file_id: str) -> File:
        return self._t.unary(self._stub.GetFile, files_pb2.GetFileRequest(id=file_id),
                             File.from_pb)

    def list(self, purpose: str = "", page_size: int = 0):
        """Every file of the tenant (of `purpose`, "" any), newest first."""
        request = files_pb2.ListFilesRequest(purpose=purpose, page_size=page_size)
        return self._t.paginate(self._stub.ListFiles, request, "files", File.from_pb)

    def delete(self, file_id: str) -> None:
        """Deletes the file; jobs made from it keep their own copy of its data."""
        return self._t.unary(self._stub.DeleteFile, files_pb2.DeleteFileRequest(id=file_id),
                             lambda _: None)

    def content(self, file_id: str) -> bytes:
        stream = self._t.stream(self._stub.GetFileContent, files_pb2.GetFileRequest(id=file_id),
                                lambda piece: piece.data, self._t.timeout)
        return self._t.fold(stream, Collect(b"".join))


class Jobs:
    """The tenant's fine-tuning jobs. Each checkpoint of a job is published as a new version of
    its adapter, servable at once."""

    def __init__(self, transport: Transport):
        self._t = transport
        self._stub = training_pb2_grpc.TrainingServiceStub(transport.channel)

    def create(self, adapter: str, data: str | os.PathLike | bytes | None = None, *,
               training_file: str | None = None, server_path: str | None = None,
               rank: int | None = None,
               alpha: float | None = None, rslora: bool = False, dora: bool = False,
               target_modules: list[str] | None = None, dropout: float | None = None,
               lr: float | None = None, weight_decay: float | None = None,
               max_grad_norm: float | None = None, schedule: str = "",
               warmup_steps: int | None = None, batch_size: int | None = None,
               grad_accumulation: int | None = None, epochs: int | None = None,
               max_steps: int | None = None, max_length: int | None = None,
               eval_fraction: float | None = None, checkpoint_every: int | None = None,
               seed: int | None = None, min_share: float | None = None,
               from_scratch: bool = False, idempotency_key: str | None = None) -> Job:
        """Starts a job training `adapter` (a new name, or an existing adapter whose next
        versions the job publishes) on `data`: a JSONL file's path or its bytes, with lines
        {"prompt","completion"}, {"messages"} or {"text"}. `training_file` instead names one
        of the tenant's files (files.upload), `server_path` a JSONL file on the server (admin
        tokens only). Settings left None take the server's
        defaults (see training.proto); an existing adapter continues from its newest version
        with its weights and settings (the Job's hyperparameters name it: parent_version),
        unless `from_scratch`. `min_share`: the share of the server's step time the job keeps
        however busy serving is (by default it trains only in the room the serving SLOs
        leave). `dora`: train a DoRA adapter (PEFT's use_dora). Retried (after a lost reply
        too) under one idempotency key, so that it starts one job: a fresh key per call, or
        `idempotency_key` to retry across processes."""
        if sum(given is not None for given in (data, training_file, server_path)) != 1:
            raise ValueError("give the training data (a JSONL path or its bytes), a "
                             "training_file or a server_path, exactly one of them")
        if data is not None and not isinstance(data, bytes):
            data = Path(data).read_bytes()
        request = training_pb2.CreateJobRequest(
            adapter=adapter, training_data=data, training_file=training_file,
            server_path=server_path,
            lora=training_pb2.LoraConfig(rank=rank, alpha=alpha, rslora=rslora, dora=dora,
                                         target_modules=target_modules, dropout=dropout),
            optimizer=training_pb2.OptimizerConfig(lr=lr, weight_decay=weight_decay,
                                                   max_grad_norm=max_grad_norm),
            schedule=schedule, warmup_steps=warmup_steps, batch_size=batch_size,
            grad_accumulation=grad_accumulation, epochs=epochs, max_steps=max_steps,
            max_length=max_length, eval_fraction=eval_fraction,
            checkpoint_every=checkpoint_every, seed=seed, min_share=min_share,
            from_scratch=from_scratch, idempotency_key=idempotency_key or new_idempotency_key())
        return self._t.unary(self._stub.CreateJob, request, Job.from_pb)

    def get(self, job_id: str) -> Job:
        return self._t.unary(self._stub.GetJob, training_pb2.GetJobRequest(id=job_id),
                             Job.from_pb)

    def list(self, state: str | None = None, page_size: int = 0, all_tenants: bool = False):
        """Every job of the tenant, or those in `state` (queued, running, succeeded, failed,
        cancelled). `all_tenants` (admin tokens only): every tenant's jobs."""
        if state is not None and state not in _JOB_STATE_NUMBERS:
            raise ValueError(f"unknown job state {state!r}; one of {', '.join(_JOB_STATE_NUMBERS)}")
        request = training_pb2.ListJobsRequest(state=_JOB_STATE_NUMBERS.get(state, 0),
                                               page_size=page_size, all_tenants=all_tenants)
        return self._t.paginate(self._stub.ListJobs, request, "jobs", Job.from_pb)

    def cancel(self, job_id: str, all_tenants: bool = False) -> Job:
        """Stops the job after its current step; the versions it published stay.
        `all_tenants` (admin tokens only): the job may be any tenant's."""
        return self._t.unary(self._stub.CancelJob,
                             training_pb2.CancelJobRequest(id=job_id, all_tenants=all_tenants),
                             Job.from_pb)

    def events(self, job_id: str, page_size: int = 0, all_tenants: bool = False):
        """The job's stored events (JobEvent), newest first: every state change, error,
        evaluation and checkpoint, and its progress thinned to about 100 events.
        `all_tenants` (admin tokens only): the job may be any tenant's."""
        request = training_pb2.ListJobEventsRequest(job_id=job_id, page_size=page_size,
                                                    all_tenants=all_tenants)
        return self._t.paginate(self._stub.ListJobEvents, request, "events", JobEvent.from_pb)

    def watch(self, job_id: str, timeout: float | None = None):
        """The job's events (JobEvent) from its current state until it ends."""
        return self._t.stream(self._stub.WatchJob, training_pb2.WatchJobRequest(id=job_id),
                              JobEvent.from_pb, timeout)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Blocks until the job ends (DeadlineExceeded after `timeout` seconds); the job then."""
        return self._t.then(self._t.fold(self.watch(job_id, timeout), UntilDone()),
                            lambda _: self.get(job_id))


class Tenants:
    """Tenants, their quotas and tokens: admin tokens only (others get PermissionDenied)."""

    def __init__(self, transport: Transport):
        self._t = transport
        self._stub = tenants_pb2_grpc.TenantServiceStub(transport.channel)

    def create(self, name: str, admin: bool = False, quotas: Quotas | None = None,
               **limits: int) -> Tenant:
        """A new tenant. `quotas` sets every limit (None in it: no limit); or `limits`
        (max_adapters=100, ...; 0: no limit) set those named and the others keep the
        server's defaults; with neither, every limit is the server's default."""
        if quotas is not None and limits:
            raise ValueError("give quotas (every limit) or limits by name (the rest the "
                             "server's defaults), not both")
        Quotas(**limits)  # an unknown limit fails here, before any call
        request = tenants_pb2.CreateTenantRequest(name=name, admin=admin)
        if quotas is not None:
            request.quotas.CopyFrom(quotas.to_pb())
        elif limits:
            request.quotas.CopyFrom(tenants_pb2.Quotas(**limits))
        return self._t.unary(self._stub.CreateTenant, request, Tenant.from_pb)

    def get(self, name: str) -> Tenant:
        return self._t.unary(self._stub.GetTenant, tenants_pb2.GetTenantRequest(name=name),
                             Tenant.from_pb)

    def list(self, page_size: int = 0):
        return self._t.paginate(self._stub.ListTenants,
                                tenants_pb2.ListTenantsRequest(page_size=page_size),
                                "tenants", Tenant.from_pb)

    def set_quotas(self, name: str, **limits: int | None) -> Tenant:
        """Changes the limits given (max_adapters=10; None or 0: no limit) and keeps the
        others. The wire replaces every quota at once, so this reads the tenant first."""
        Quotas(**limits)  # an unknown limit fails here, before any call
        return self._t.then(self.get(name), lambda tenant: self._t.unary(
            self._stub.SetQuotas,
            tenants_pb2.SetQuotasRequest(
                name=name, quotas=dataclasses.replace(tenant.quotas, **limits).to_pb()),
            Tenant.from_pb))

    def delete(self, name: str) -> TenantDeletion:
        """Deletes the tenant with its tokens (they stop working at once), adapters, jobs
        (those running are cancelled) and files. Admin tenants cannot be deleted
        (FailedPrecondition)."""
        return self._t.unary(self._stub.DeleteTenant,
                             tenants_pb2.DeleteTenantRequest(name=name), TenantDeletion.from_pb)

    def issue_token(self, tenant: str, description: str = "") -> IssuedToken:
        """A new token of `tenant`; its secret is in the result only, this once."""
        request = tenants_pb2.IssueTokenRequest(tenant=tenant, description=description)
        return self._t.unary(self._stub.IssueToken, request, IssuedToken.from_pb)

    def revoke_token(self, token_id: str) -> bool:
        return self._t.unary(self._stub.RevokeToken,
                             tenants_pb2.RevokeTokenRequest(id=token_id),
                             lambda response: response.revoked)
