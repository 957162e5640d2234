"""FileService and ListJobEvents of a real `cotune serve`: uploads in pieces through the
adapter upload machinery (bounds, idle timeout, header checks), a tenant's files only, a job
made from a file, the job's events read back after it ended, and a deleted tenant's files."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from server_helpers import running_server
from wire import Caller, code_of

from cotune.server.jobs import PROGRESS_EVENTS_KEPT, _kept
from cotune.v1 import files_pb2, files_pb2_grpc, tenants_pb2, training_pb2

pytestmark = pytest.mark.slow

DATA = "\n".join(json.dumps({"text": f"the cat {i} sat on the mat"}) for i in range(8)).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    with running_server(root, "--max-upload-mb", "1", "--upload-idle-timeout", "1") as server:
        yield server


class Files:
    """A tenant's FileService calls."""

    def __init__(self, caller: Caller):
        self.caller, self.metadata = caller, caller.metadata
        self.stub = files_pb2_grpc.FileServiceStub(caller.channel)

    def upload(self, data: bytes, filename: str = "train.jsonl", purpose: str = "fine-tune",
               piece: int = 100, pause: float = 0):
        def messages():
            yield files_pb2.UploadFileRequest(header=files_pb2.UploadFileHeader(
                filename=filename, purpose=purpose))
            time.sleep(pause)
            for start in range(0, len(data), piece):
                yield files_pb2.UploadFileRequest(data=data[start:start + piece])
        return self.stub.UploadFile(messages(), metadata=self.metadata, timeout=60)

    def content(self, file_id: str) -> bytes:
        return b"".join(p.data for p in self.stub.GetFileContent(
            files_pb2.GetFileRequest(id=file_id), metadata=self.metadata, timeout=60))

    def list(self, **fields):
        return self.stub.ListFiles(files_pb2.ListFilesRequest(**fields), metadata=self.metadata)


@pytest.fixture(scope="module")
def tenants(server, admin):
    return {name: Files(Caller(server.address, admin.new_tenant(name)))
            for name in ("acme", "globex", "leaving")}


def events_of(caller: Caller, job_id: str, **fields) -> training_pb2.ListJobEventsResponse:
    return caller.training.ListJobEvents(
        training_pb2.ListJobEventsRequest(job_id=job_id, **fields), metadata=caller.metadata)


def test_an_upload_in_pieces_is_kept_whole_and_only_its_tenant_reaches_it(tenants):
    acme, globex = tenants["acme"], tenants["globex"]
    file = acme.upload(DATA, piece=7)
    assert (file.filename, file.purpose, file.size_bytes) == ("train.jsonl", "fine-tune",
                                                              len(DATA))
    assert acme.content(file.id) == DATA
    assert [f.id for f in acme.list().files] == [file.id]
    request = files_pb2.GetFileRequest(id=file.id)
    for call in (lambda: globex.stub.GetFile(request, metadata=globex.metadata),
                 lambda: globex.content(file.id),
                 lambda: globex.stub.DeleteFile(files_pb2.DeleteFileRequest(id=file.id),
                                                metadata=globex.metadata),
                 lambda: globex.caller.training.CreateJob(training_pb2.CreateJobRequest(
                     adapter="stolen", training_file=file.id), metadata=globex.metadata)):
        assert code_of(call) == grpc.StatusCode.NOT_FOUND
    assert globex.list().files == []
    assert code_of(lambda: acme.stub.GetFile(files_pb2.GetFileRequest(id="../registry.sqlite3"),
                                             metadata=acme.metadata)) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("fields, message", [
    (dict(purpose="assistants"), "purpose 'assistants' not accepted; accepted: fine-tune"),
    (dict(filename=""), "filename '' not accepted; accepted: 1-255 characters"),
    (dict(filename="a\nb"), "filename 'a\\nb' not accepted"),
    (dict(data=DATA + b'\n{"prompt": "p", "completion": "c"}'),
     "train.jsonl:9: this line is in the prompt/completion form but line 1 is in the text form"),
    (dict(data=b"\n\n"), "train.jsonl: the file holds no examples"),
    (dict(data=b'{"text": "x"}\n' * 80_000), "the upload exceeds 1 MiB, this server's "
                                             "--max-upload-mb"),
])
def test_a_refused_upload_says_why_and_keeps_nothing(tenants, fields, message):
    globex = tenants["globex"]
    with pytest.raises(grpc.RpcError) as caught:
        globex.upload(**{"data": DATA, "piece": 1 << 16, **fields})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert globex.list().files == []


def test_an_upload_that_stops_sending_is_dropped_after_the_idle_timeout(tenants):
    with pytest.raises(grpc.RpcError) as caught:
        tenants["globex"].upload(DATA, pause=3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--upload-idle-timeout" in caught.value.details()


def test_a_job_made_from_a_file_keeps_its_events_for_after_the_fact(tenants):
    acme = tenants["acme"]
    file = acme.upload(DATA)
    job = acme.caller.training.CreateJob(training_pb2.CreateJobRequest(
        adapter="from-file", training_file=file.id, batch_size=4, checkpoint_every=1),
        metadata=acme.metadata, timeout=60)
    assert job.training_file == file.id
    acme.stub.DeleteFile(files_pb2.DeleteFileRequest(id=file.id), metadata=acme.metadata)
    assert list(acme.caller.watch(job.id))[-1].state == training_pb2.JOB_STATE_SUCCEEDED

    events = events_of(acme.caller, job.id).events  # the job no longer runs: all stored
    kinds = [e.WhichOneof("event") for e in events][::-1]
    assert kinds == ["state", "state", "progress", "evaluation", "checkpoint", "progress",
                     "evaluation", "checkpoint", "state"]
    assert [e.sequence for e in events] == list(range(len(events), 0, -1))
    checkpoints = [e.checkpoint for e in events if e.WhichOneof("event") == "checkpoint"]
    assert [(c.step, c.version) for c in checkpoints] == [(2, "from-file@v2"),
                                                          (1, "from-file@v1")]
    assert checkpoints[0].metrics["train_loss"] > 0
    first = events_of(acme.caller, job.id, page_size=4)
    rest = events_of(acme.caller, job.id, page_token=first.next_page_token)
    assert list(first.events) + list(rest.events) == list(events)
    assert code_of(lambda: events_of(tenants["globex"].caller, job.id)) == \
        grpc.StatusCode.NOT_FOUND


def test_deleting_a_tenant_deletes_its_files(server, admin, tenants):
    leaving = tenants["leaving"]
    leaving.upload(DATA)
    deletion = admin.tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(name="leaving"),
                                          metadata=admin.metadata)
    assert deletion.files_deleted == 1
    kept = {f.id for f in tenants["acme"].list().files}
    assert {p.name for p in (server.data_dir / "files").iterdir()} == kept


def test_progress_events_stored_per_job_are_bounded_however_long_it_runs():
    for total in (1, 7, 100, 1_000, 123_457):
        kept = [step for step in range(1, total + 1) if _kept(step, total)]
        assert kept[0] == 1 and kept[-1] == total
        assert len(kept) <= PROGRESS_EVENTS_KEPT + 2
