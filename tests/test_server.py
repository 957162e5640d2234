"""The gRPC server as clients meet it: a real `cotune serve` on 127.0.0.1, called through the
generated stubs. Authentication on every RPC, tenant isolation, the adapter and job lifecycle
checked against PEFT, and what survives kill -9 and SIGTERM."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
import torch
from conftest import tiny_hf_model
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import TRAINING_DATA, running_server, start_server, tiny_adapter_dir
from wire import ADAPTER_FILES, Caller, code_of

from cotune.v1 import (
    adapters_pb2,
    common_pb2,
    files_pb2,
    inference_pb2,
    tenants_pb2,
    training_pb2,
)

pytestmark = pytest.mark.slow

JOB = dict(max_steps=6, checkpoint_every=2, batch_size=2, seed=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server")) as running:
        yield running


def every_rpc(caller: Caller) -> dict:
    """One call of every method of every cotune service, with well-formed requests."""
    md, a, t, i, n, f = (caller.metadata, caller.adapters, caller.training, caller.inference,
                         caller.tenants, caller.files)
    header = adapters_pb2.CreateAdapterRequest(header=adapters_pb2.CreateAdapterHeader(name="x"))
    return {
        "AdapterService.CreateAdapter": lambda: a.CreateAdapter(iter([header]), metadata=md),
        "AdapterService.GetAdapter": lambda: a.GetAdapter(
            adapters_pb2.GetAdapterRequest(name="x"), metadata=md),
        "AdapterService.ListAdapters": lambda: a.ListAdapters(
            adapters_pb2.ListAdaptersRequest(), metadata=md),
        "AdapterService.ListVersions": lambda: a.ListVersions(
            adapters_pb2.ListVersionsRequest(name="x"), metadata=md),
        "AdapterService.DeleteAdapter": lambda: a.DeleteAdapter(
            adapters_pb2.DeleteAdapterRequest(name="x"), metadata=md),
        "AdapterService.ExportAdapter": lambda: list(a.ExportAdapter(
            adapters_pb2.ExportAdapterRequest(name="x"), metadata=md)),
        "AdapterService.MergeAdapters": lambda: a.MergeAdapters(
            adapters_pb2.MergeAdaptersRequest(name="x", method="linear", parents=[
                adapters_pb2.MergeParent(adapter="y", weight=1)]), metadata=md),
        "TrainingService.CreateJob": lambda: t.CreateJob(
            training_pb2.CreateJobRequest(adapter="x", training_data=TRAINING_DATA), metadata=md),
        "TrainingService.GetJob": lambda: t.GetJob(training_pb2.GetJobRequest(id="j"),
                                                   metadata=md),
        "TrainingService.ListJobs": lambda: t.ListJobs(training_pb2.ListJobsRequest(),
                                                       metadata=md),
        "TrainingService.CancelJob": lambda: t.CancelJob(training_pb2.CancelJobRequest(id="j"),
                                                         metadata=md),
        "TrainingService.WatchJob": lambda: list(t.WatchJob(
            training_pb2.WatchJobRequest(id="j"), metadata=md)),
        "InferenceService.Generate": lambda: list(i.Generate(
            inference_pb2.GenerateRequest(prompt="hi"), metadata=md)),
        "InferenceService.Abort": lambda: i.Abort(inference_pb2.AbortRequest(request_id="r"),
                                                  metadata=md),
        "InferenceService.Tokenize": lambda: i.Tokenize(inference_pb2.TokenizeRequest(text="hi"),
                                                        metadata=md),
        "InferenceService.GetModelInfo": lambda: i.GetModelInfo(
            inference_pb2.GetModelInfoRequest(), metadata=md),
        "TenantService.CreateTenant": lambda: n.CreateTenant(
            tenants_pb2.CreateTenantRequest(name="x"), metadata=md),
        "TenantService.GetTenant": lambda: n.GetTenant(tenants_pb2.GetTenantRequest(name="x"),
                                                       metadata=md),
        "TenantService.ListTenants": lambda: n.ListTenants(tenants_pb2.ListTenantsRequest(),
                                                           metadata=md),
        "TenantService.SetQuotas": lambda: n.SetQuotas(tenants_pb2.SetQuotasRequest(name="x"),
                                                       metadata=md),
        "TenantService.IssueToken": lambda: n.IssueToken(
            tenants_pb2.IssueTokenRequest(tenant="x"), metadata=md),
        "TenantService.RevokeToken": lambda: n.RevokeToken(
            tenants_pb2.RevokeTokenRequest(id="x"), metadata=md),
        "TenantService.DeleteTenant": lambda: n.DeleteTenant(
            tenants_pb2.DeleteTenantRequest(name="x"), metadata=md),
        "TrainingService.ListJobEvents": lambda: t.ListJobEvents(
            training_pb2.ListJobEventsRequest(job_id="j"), metadata=md),
        "TrainingService.CreateSession": lambda: t.CreateSession(
            training_pb2.CreateSessionRequest(adapter="x"), metadata=md),
        "TrainingService.GetSession": lambda: t.GetSession(
            training_pb2.GetSessionRequest(id="s"), metadata=md),
        "TrainingService.ListSessions": lambda: t.ListSessions(
            training_pb2.ListSessionsRequest(), metadata=md),
        "TrainingService.CloseSession": lambda: t.CloseSession(
            training_pb2.CloseSessionRequest(id="s"), metadata=md),
        "TrainingService.ForwardBackward": lambda: t.ForwardBackward(
            training_pb2.ForwardBackwardRequest(session_id="s"), metadata=md),
        "TrainingService.Forward": lambda: t.Forward(
            training_pb2.ForwardRequest(session_id="s"), metadata=md),
        "TrainingService.OptimStep": lambda: t.OptimStep(
            training_pb2.OptimStepRequest(session_id="s"), metadata=md),
        "TrainingService.SaveVersion": lambda: t.SaveVersion(
            training_pb2.SaveVersionRequest(session_id="s"), metadata=md),
        "FileService.UploadFile": lambda: f.UploadFile(iter([files_pb2.UploadFileRequest(
            header=files_pb2.UploadFileHeader(filename="x.jsonl", purpose="fine-tune")),
            files_pb2.UploadFileRequest(data=TRAINING_DATA)]), metadata=md),
        "FileService.GetFile": lambda: f.GetFile(files_pb2.GetFileRequest(id="file-x"),
                                                 metadata=md),
        "FileService.ListFiles": lambda: f.ListFiles(files_pb2.ListFilesRequest(), metadata=md),
        "FileService.DeleteFile": lambda: f.DeleteFile(files_pb2.DeleteFileRequest(id="file-x"),
                                                       metadata=md),
        "FileService.GetFileContent": lambda: list(f.GetFileContent(
            files_pb2.GetFileRequest(id="file-x"), metadata=md)),
    }


def test_every_rpc_is_listed_here():
    methods = {f"{s.name}.{m.name}"
               for module in (adapters_pb2, files_pb2, inference_pb2, tenants_pb2, training_pb2)
               for s in module.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert methods == set(every_rpc(Caller("127.0.0.1:1", None)))


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer ct_000000000000_wrong",
                                    "Bearer garbage", "Basic dXNlcjpwYXNz"])
def test_every_rpc_but_health_refuses_a_caller_without_a_valid_token(server, header):
    caller = Caller(server.address, None)
    if header is not None:
        caller.metadata = [("authorization", header)]
    try:
        codes = {name: code_of(call) for name, call in every_rpc(caller).items()}
        assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
        health = health_pb2_grpc.HealthStub(caller.channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        caller.close()


def test_every_rpc_refuses_a_call_with_two_authorization_headers(server):
    """Which of two headers would count is the server's guess (it was the last): neither does,
    even when both hold the admin's valid token."""
    caller = Caller(server.address, server.admin_token)
    caller.metadata = caller.metadata * 2
    try:
        for name, call in every_rpc(caller).items():
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert refused.value.details() == "2 authorization headers; accepted: exactly " \
                                              "one, 'authorization: Bearer <token>'", name
    finally:
        caller.close()


def test_a_revoked_token_is_refused_and_tenant_service_needs_an_admin(server, admin):
    token = admin.new_tenant("revokee")
    caller = Caller(server.address, token)
    try:
        assert caller.inference.GetModelInfo(inference_pb2.GetModelInfoRequest(),
                                             metadata=caller.metadata).vocab_size == 320
        assert code_of(lambda: caller.tenants.ListTenants(
            tenants_pb2.ListTenantsRequest(), metadata=caller.metadata)) \
            == grpc.StatusCode.PERMISSION_DENIED
        token_id = token.split("_")[1]
        assert admin.tenants.RevokeToken(tenants_pb2.RevokeTokenRequest(id=token_id),
                                         metadata=admin.metadata).revoked
        assert code_of(lambda: caller.inference.GetModelInfo(
            inference_pb2.GetModelInfoRequest(), metadata=caller.metadata)) \
            == grpc.StatusCode.UNAUTHENTICATED
    finally:
        caller.close()


def _finish(caller: Caller, job_id: str) -> list:
    events = list(caller.watch(job_id))
    states = [e.state for e in events if e.WhichOneof("event") == "state"]
    assert states[-1] == training_pb2.JOB_STATE_SUCCEEDED, events
    return events


def test_tenants_cannot_reach_or_see_each_others_adapters_jobs_and_requests(server, admin,
                                                                           tmp_path):
    a = Caller(server.address, admin.new_tenant("iso-a"))
    b = Caller(server.address, admin.new_tenant("iso-b"))
    try:
        published = a.upload("secret", tiny_adapter_dir(tmp_path / "secret", seed=1))
        job = a.create_job("secret-job", TRAINING_DATA, max_steps=2, batch_size=2)
        _finish(a, job.id)
        md = b.metadata
        refused = {
            "GetAdapter": lambda: b.adapters.GetAdapter(
                adapters_pb2.GetAdapterRequest(name="secret"), metadata=md),
            "ListVersions": lambda: b.adapters.ListVersions(
                adapters_pb2.ListVersionsRequest(name="secret"), metadata=md),
            "ExportAdapter": lambda: b.export("secret"),
            "ExportAdapter@v1": lambda: b.export("secret@v1"),
            "DeleteAdapter": lambda: b.adapters.DeleteAdapter(
                adapters_pb2.DeleteAdapterRequest(name="secret"), metadata=md),
            "Generate": lambda: b.generate(adapter="secret"),
            "Generate job's": lambda: b.generate(adapter="secret-job@v1"),
            "GetJob": lambda: b.training.GetJob(training_pb2.GetJobRequest(id=job.id),
                                                metadata=md),
            "CancelJob": lambda: b.training.CancelJob(training_pb2.CancelJobRequest(id=job.id),
                                                      metadata=md),
            "WatchJob": lambda: list(b.watch(job.id)),
        }
        for name, call in refused.items():
            with pytest.raises(grpc.RpcError) as refusal:
                call()
            assert refusal.value.code() == grpc.StatusCode.NOT_FOUND, name
            assert "iso-a" not in refusal.value.details(), name
        assert not b.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(),
                                           metadata=md).adapters
        assert not b.training.ListJobs(training_pb2.ListJobsRequest(), metadata=md).jobs

        # A request id is the tenant's own: B cannot abort A's request of the same id.
        outcome = {}
        running = threading.Thread(target=lambda: outcome.update(
            a=a.generate(max_tokens=60, request_id="same-id")))
        running.start()
        time.sleep(0.5)
        assert not b.inference.Abort(inference_pb2.AbortRequest(request_id="same-id"),
                                     metadata=md).aborted
        running.join()
        assert outcome["a"][-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH

        # B's own "secret" is another adapter; A's is untouched.
        mine = b.upload("secret", tiny_adapter_dir(tmp_path / "b-secret", seed=2))
        assert mine.version == 1 and mine.sha256 != published.sha256
        theirs = a.adapters.ListVersions(adapters_pb2.ListVersionsRequest(name="secret"),
                                         metadata=a.metadata).versions
        assert [(v.version, v.sha256) for v in theirs] == [(1, published.sha256)]
    finally:
        a.close()
        b.close()


def test_the_sdk_takes_an_adapter_from_upload_through_training_to_peft_with_its_logits(
        server, tmp_path):
    from peft import PeftModel

    from cotune.client import Client

    with Client(server.address, server.admin_token) as client:
        uploaded = client.adapters.create("bot", tiny_adapter_dir(tmp_path / "bot", seed=5),
                                          labels={"t": "1"})
        assert (uploaded.name, uploaded.version, uploaded.rank) == ("bot", 1, 4)
        deltas = list(client.generate("the cat", adapter="bot", max_tokens=6))
        assert deltas[0].adapter == "bot@v1" and len(deltas) >= 2  # streamed, not at once
        assert deltas[-1].usage.completion_tokens == 6 == sum(len(d.token_ids) for d in deltas)

        # Every version a job publishes is servable at once, while the job goes on.
        job = client.jobs.create("facts", TRAINING_DATA, **JOB)
        served = [client.complete("the cat", adapter=event.version, max_tokens=2).adapter
                  for event in client.jobs.watch(job.id) if event.kind == "checkpoint"]
        assert served == ["facts@v1", "facts@v2", "facts@v3"]
        done = client.jobs.get(job.id)
        assert (done.state, done.step, done.versions) == ("succeeded", 6, tuple(served))
        versions = list(client.adapters.versions("facts"))
        assert [v.provenance["parent_version"] for v in versions] == [None, 1, 2]
        assert {v.provenance["job_id"] for v in versions} == {job.id}

        # The exported version loads in PEFT and gives the logits cotune served.
        exported = client.adapters.export("facts@v3", tmp_path / "exported")
        completion = client.complete("the cat", adapter="facts", max_tokens=8, logprobs=0)
        prompt = client.tokenize("the cat")
    tokens = list(completion.token_ids)
    peft_model = PeftModel.from_pretrained(tiny_hf_model("llama2"), exported).eval()
    with torch.no_grad():
        logits = peft_model(torch.tensor([prompt + tokens])).logits[0]
    logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    assert logprobs.argmax(-1).tolist() == tokens
    reference = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]
    served_logprobs = torch.tensor([lp.logprob for lp in completion.logprobs])
    torch.testing.assert_close(served_logprobs, reference.float(), atol=1e-4, rtol=0)


def _upload_interrupted(address: str, token: str, directory) -> None:
    """Sends the header, the config and half the weights, then hangs until the server dies."""
    caller = Caller(address, token)
    weights = (directory / ADAPTER_FILES[1]).read_bytes()

    def messages():
        yield adapters_pb2.CreateAdapterRequest(
            header=adapters_pb2.CreateAdapterHeader(name="torn"))
        yield adapters_pb2.CreateAdapterRequest(chunk=common_pb2.FileChunk(
            path=ADAPTER_FILES[0], data=(directory / ADAPTER_FILES[0]).read_bytes()))
        yield adapters_pb2.CreateAdapterRequest(chunk=common_pb2.FileChunk(
            path=ADAPTER_FILES[1], data=weights[:len(weights) // 2]))
        time.sleep(120)

    try:
        caller.adapters.CreateAdapter(messages(), metadata=caller.metadata, timeout=120)
    except grpc.RpcError:
        pass


def test_kill_9_during_a_job_and_an_upload_loses_nothing_and_the_job_resumes_exactly(
        tmp_path):
    root = tmp_path
    server = start_server(root)
    try:
        caller = Caller(server.address, server.admin_token)
        kept = caller.upload("kept", tiny_adapter_dir(root / "kept", seed=7))
        reference = caller.create_job("reference", TRAINING_DATA, **JOB)
        _finish(caller, reference.id)
        expected = caller.export("reference@v3")

        job = caller.create_job("interrupted", TRAINING_DATA, **JOB)
        for event in caller.watch(job.id):  # wait for the first version, then kill
            if event.WhichOneof("event") == "checkpoint":
                break
        threading.Thread(target=_upload_interrupted, daemon=True,
                         args=(server.address, server.admin_token, root / "kept")).start()
        time.sleep(1.0)
        caller.close()
        server.stop(signal.SIGKILL)

        server = start_server(root, data_dir=server.data_dir)
        caller = Caller(server.address, server.admin_token)
        _finish(caller, job.id)
        assert caller.export("interrupted@v3") == expected  # the same weights, bit for bit
        losses = [[v.provenance.metrics["train_loss"] for v in caller.adapters.ListVersions(
            adapters_pb2.ListVersionsRequest(name=name), metadata=caller.metadata).versions]
            for name in ("reference", "interrupted")]
        assert losses[0] == losses[1]
        versions = caller.adapters.ListVersions(adapters_pb2.ListVersionsRequest(name="kept"),
                                                metadata=caller.metadata).versions
        assert [(v.version, v.sha256) for v in versions] == [(1, kept.sha256)]
        assert code_of(lambda: caller.adapters.GetAdapter(adapters_pb2.GetAdapterRequest(
            name="torn"), metadata=caller.metadata)) == grpc.StatusCode.NOT_FOUND
        assert not any((server.data_dir / "uploads").iterdir())
        caller.close()
    finally:
        server.stop(signal.SIGKILL)


def test_sigterm_drains_in_flight_generations_and_keeps_jobs_for_the_next_start(tmp_path):
    # A drain long enough for 200 tokens beside a training job on a slow machine: the test is
    # that they complete, not how fast.
    server = start_server(tmp_path, "--grace-period", "60")
    caller = Caller(server.address, server.admin_token)
    try:
        job = caller.create_job("long", TRAINING_DATA, max_steps=10_000, batch_size=2)
        outcome = {}

        def generate():
            try:
                outcome["responses"] = caller.generate(max_tokens=200)
            except grpc.RpcError as e:
                outcome["error"] = e

        generating = threading.Thread(target=generate)
        generating.start()
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(caller.channel)
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                break  # the server stopped listening
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        generating.join(90)
        assert server.proc.wait(120) == 0
        assert "error" not in outcome, outcome.get("error")
        responses = outcome["responses"]
        assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert len(caller.tokens_of(responses)) == 200
    finally:
        caller.close()
        server.stop(signal.SIGKILL)

    server = start_server(tmp_path, data_dir=server.data_dir)
    caller = Caller(server.address, server.admin_token)
    try:
        record = caller.training.GetJob(training_pb2.GetJobRequest(id=job.id),
                                        metadata=caller.metadata)
        assert record.state == training_pb2.JOB_STATE_RUNNING
        assert any("resumed " + job.id in line for line in server.output)
        # The job published a version as it stopped (checkpoint_every was 0: no other).
        assert list(record.versions) == ["long@v1"]
    finally:
        caller.close()
        server.stop(signal.SIGKILL)


def test_a_call_past_its_deadline_frees_its_place_long_before_it_would_have_ended(server,
                                                                                 admin):
    caller = Caller(server.address, admin.new_tenant("hasty", max_queued_requests=1))
    try:
        started = time.monotonic()
        assert len(caller.tokens_of(caller.generate(max_tokens=240))) == 240
        whole_run = time.monotonic() - started
        request = inference_pb2.GenerateRequest(
            prompt="the cat", request_id="slow",
            sampling=inference_pb2.SamplingParams(max_tokens=240))
        with pytest.raises(grpc.RpcError) as late:
            list(caller.inference.Generate(request, metadata=caller.metadata,
                                           timeout=whole_run / 10))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        expired = time.monotonic()
        # The engine request was aborted: the tenant's one place and the request id are
        # free again long before the 240 tokens would have been generated.
        while True:
            try:
                again = caller.generate(max_tokens=1, request_id="slow")
                break
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    grpc.StatusCode.ALREADY_EXISTS), e
                assert time.monotonic() - expired < whole_run / 2, "the request kept running"
                time.sleep(0.01)
        assert again[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    finally:
        caller.close()


def test_a_preset_admin_token_from_a_file_is_the_admin_s_at_the_first_start(tmp_path):
    preset = tmp_path / "admin-secret"
    preset.write_text("ct_00000000abcd_" + "s" * 43 + "\n")
    with running_server(tmp_path, "--admin-token-file", str(preset)) as server:
        caller = Caller(server.address, preset.read_text().strip())
        try:
            tenants = caller.tenants.ListTenants(tenants_pb2.ListTenantsRequest(),
                                                 metadata=caller.metadata).tenants
            assert [(t.name, t.admin) for t in tenants] == [("admin", True)]
            assert not (server.data_dir / "admin.token").exists()
        finally:
            caller.close()
