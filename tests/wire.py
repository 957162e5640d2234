"""The generated stubs with a token: how the server tests call a real server without the SDK."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from cotune.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    files_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class Caller:
    def __init__(self, address: str, token: str | None):
        self.channel = grpc.insecure_channel(address)
        self.metadata = [] if token is None else [("authorization", f"Bearer {token}")]
        self.adapters = adapters_pb2_grpc.AdapterServiceStub(self.channel)
        self.training = training_pb2_grpc.TrainingServiceStub(self.channel)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.tenants = tenants_pb2_grpc.TenantServiceStub(self.channel)
        self.files = files_pb2_grpc.FileServiceStub(self.channel)

    def upload(self, name: str, directory: Path, **header):
        return self.adapters.CreateAdapter(_upload(name, directory, header),
                                           metadata=self.metadata, timeout=60)

    def held_upload(self, name: str, directory: Path, release: threading.Event):
        """An upload held in flight: its files follow the header once `release` is set. The
        future of its reply."""
        return self.adapters.CreateAdapter.future(_upload(name, directory, {}, release),
                                                  metadata=self.metadata, timeout=90)

    def generate(self, prompt: str = "the cat", adapter: str = "", max_tokens: int = 8,
                 **fields) -> list:
        request = inference_pb2.GenerateRequest(
            prompt=prompt, adapter=adapter,
            sampling=inference_pb2.SamplingParams(max_tokens=max_tokens), **fields)
        return list(self.inference.Generate(request, metadata=self.metadata, timeout=120))

    def tokens_of(self, responses: list) -> list[int]:
        return [t for r in responses for t in r.token_ids]

    def export(self, name: str) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        for chunk in self.adapters.ExportAdapter(adapters_pb2.ExportAdapterRequest(name=name),
                                                 metadata=self.metadata, timeout=60):
            files[chunk.path] = files.get(chunk.path, b"") + chunk.data
        return files

    def create_job(self, adapter: str, data: bytes, **settings) -> training_pb2.Job:
        return self.training.CreateJob(
            training_pb2.CreateJobRequest(adapter=adapter, training_data=data, **settings),
            metadata=self.metadata, timeout=60)

    def watch(self, job_id: str, timeout: float = 300):
        return self.training.WatchJob(training_pb2.WatchJobRequest(id=job_id),
                                      metadata=self.metadata, timeout=timeout)

    def new_tenant(self, name: str, **quotas) -> str:
        """Creates a tenant (the caller must be an admin); returns a token of it."""
        request = tenants_pb2.CreateTenantRequest(name=name)
        if quotas:
            request.quotas.CopyFrom(tenants_pb2.Quotas(**quotas))
        self.tenants.CreateTenant(request, metadata=self.metadata)
        issued = self.tenants.IssueToken(tenants_pb2.IssueTokenRequest(tenant=name),
                                         metadata=self.metadata)
        return issued.token

    def close(self) -> None:
        self.channel.close()


def code_of(call) -> grpc.StatusCode | None:
    """The status code `call` fails with, None when it succeeds."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return None


def _upload(name: str, directory: Path, header: dict, release: threading.Event | None = None):
    """The messages of an upload of `directory`'s adapter; the files wait for `release`."""
    yield adapters_pb2.CreateAdapterRequest(
        header=adapters_pb2.CreateAdapterHeader(name=name, **header))
    if release is not None:
        release.wait(60)
    for file_name in ADAPTER_FILES:
        yield adapters_pb2.CreateAdapterRequest(chunk=common_pb2.FileChunk(
            path=file_name, data=(directory / file_name).read_bytes()))
