"""OpenAI's files and fine-tuning jobs on the HTTP front of a real `cotune serve --http-port`,
called with the real `openai` client: a tenant's files and no one else's, a bad line refused
by its number, a job that trains an adapter whose versions serve at once (proved through gRPC
Generate), its stored events and checkpoints, continuing an adapter, cancelling, and the
quota and not-found errors as OpenAI's."""

from __future__ import annotations

import time

import httpx2 as httpx
import openai
import pytest
from server_helpers import TRAINING_DATA, running_server
from wire import Caller

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("http-fine-tuning")
    with running_server(root, "--http-port", "0", "--max-files-per-tenant", "3",
                        "--max-upload-mb", "1") as server:
        yield server


@pytest.fixture(scope="module")
def tokens(server, admin):
    return {name: admin.new_tenant(name, max_concurrent_jobs=1)
            for name in ("acme", "globex", "hoarder", "waiter")}


def client(server, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url(), api_key=token, max_retries=0)


def upload(api: openai.OpenAI, data: bytes = TRAINING_DATA, name: str = "train.jsonl"):
    return api.files.create(file=(name, data), purpose="fine-tune")


def finished(api: openai.OpenAI, job_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"{job_id} still {job.status} after {timeout} s")


def served_by(server, token: str, model: str) -> str:
    """The version gRPC Generate serves for `model`."""
    caller = Caller(server.address, token)
    try:
        return caller.generate("the cat", adapter=model, max_tokens=2)[0].adapter
    finally:
        caller.close()


def test_files_are_uploaded_listed_read_and_deleted_and_others_files_are_404(server, tokens):
    acme, globex = client(server, tokens["acme"]), client(server, tokens["globex"])
    created = upload(acme, name="cats.jsonl")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == \
        (len(TRAINING_DATA), "cats.jsonl", "fine-tune", "processed")
    assert acme.files.retrieve(created.id) == created
    assert created.id in [f.id for f in acme.files.list()]
    assert acme.files.content(created.id).content == TRAINING_DATA
    with pytest.raises(openai.NotFoundError) as caught:
        globex.files.retrieve(created.id)
    assert caught.value.body["param"] == "file_id"
    with pytest.raises(openai.NotFoundError):
        globex.files.delete(created.id)
    assert globex.files.list().data == []
    deleted = acme.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(created.id)


def test_a_malformed_file_is_400_naming_its_line_and_is_not_kept(server, tokens):
    api = client(server, tokens["globex"])
    bad = TRAINING_DATA + b'\n{"prompt": "no completion"}\n'
    with pytest.raises(openai.BadRequestError) as caught:
        upload(api, bad, name="bad.jsonl")
    error = caught.value.body
    assert error["message"].startswith("bad.jsonl:9: missing field 'completion'")
    assert error["param"] == "file"
    with pytest.raises(openai.BadRequestError, match="purpose 'batch' not accepted"):
        api.files.create(file=("x.jsonl", TRAINING_DATA), purpose="batch")
    assert api.files.list().data == []


def test_an_upload_past_max_upload_mb_is_413_and_a_bad_token_401_before_its_body(server,
                                                                                 tokens):
    big = b'{"text": "' + b"x" * (2 << 20) + b'"}\n'
    with pytest.raises(openai.AuthenticationError):
        upload(client(server, "ct_not_a_token"), big)
    api = client(server, tokens["globex"])
    with pytest.raises(openai.APIStatusError) as caught:
        upload(api, big)
    assert caught.value.status_code == 413 and "--max-upload-mb" in caught.value.message

    def chunked():  # no Content-Length: counted as it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
        for _ in range(40):
            yield b"x" * (64 << 10)
        yield b"\r\n--b--\r\n"

    reply = httpx.post(server.openai_url() + "/files", content=chunked(), timeout=30, headers={
        "Authorization": f"Bearer {tokens['globex']}",
        "Content-Type": "multipart/form-data; boundary=b"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "file_too_large"
    assert api.files.list().data == []


def test_a_tenants_files_are_bounded_by_max_files_per_tenant(server, tokens):
    api = client(server, tokens["hoarder"])
    files = [upload(api) for _ in range(3)]
    with pytest.raises(openai.RateLimitError, match="--max-files-per-tenant"):
        upload(api)
    page = api.files.list(limit=2)
    assert [f.id for f in page.data] == [f.id for f in files[::-1][:2]] and page.has_more
    rest = api.files.list(limit=2, after=page.data[-1].id)
    assert [f.id for f in rest.data] == [files[0].id] and not rest.has_more


def test_a_job_trains_an_adapter_whose_versions_serve_at_once_and_continues_it(server, tokens):
    api = client(server, tokens["acme"])
    file = upload(api)
    job = api.fine_tuning.jobs.create(
        training_file=file.id, model=api.models.list().data[0].id, suffix="cat-sitter",
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2})
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    assert job.training_file == file.id and job.organization_id == "cotune"
    done = finished(api, job.id)
    assert done.status == "succeeded" and done.error is None
    assert done.fine_tuned_model == "cat-sitter" and done.trained_tokens > 0
    assert done.hyperparameters.n_epochs == 1 and done.hyperparameters.batch_size == 4
    assert done.hyperparameters.learning_rate_multiplier == pytest.approx(2)
    assert done.finished_at >= done.created_at

    events = api.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert [e.message for e in events if e.type == "message"][:2] == [
        "Fine-tuning job succeeded", "Checkpoint cat-sitter@v1 at step 2: servable now"]
    assert events[-1].message == "Fine-tuning job queued"  # newest first
    progress = [e.data for e in events if e.type == "metrics" and "total_steps" in e.data]
    assert [p["step"] for p in progress] == [2, 1] and progress[0]["train_loss"] > 0
    page = api.fine_tuning.jobs.list_events(job.id, limit=2)
    rest = api.fine_tuning.jobs.list_events(job.id, limit=100, after=page.data[-1].id)
    assert page.has_more and [e.id for e in page.data + rest.data] == [e.id for e in events]

    (checkpoint,) = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoint.fine_tuned_model_checkpoint == "cat-sitter@v1"
    assert checkpoint.step_number == 2 and checkpoint.fine_tuning_job_id == job.id
    assert checkpoint.metrics.step == 2 and checkpoint.metrics.train_loss > 0
    assert served_by(server, tokens["acme"], "cat-sitter@v1") == "cat-sitter@v1"

    again = api.fine_tuning.jobs.create(training_file=file.id, model="cat-sitter")
    assert again.model == "cat-sitter@v1"  # it continues the newest version
    assert finished(api, again.id).status == "succeeded"
    (second,) = api.fine_tuning.jobs.checkpoints.list(again.id).data
    assert second.fine_tuned_model_checkpoint == "cat-sitter@v2"
    assert served_by(server, tokens["acme"], "cat-sitter") == "cat-sitter@v2"
    jobs = api.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in jobs.data] == [again.id] and jobs.has_more


def test_a_job_is_cancelled_and_the_job_quota_is_429(server, tokens):
    api = client(server, tokens["waiter"])
    file = upload(api)
    base = api.models.list().data[0].id
    settings = dict(training_file=file.id, model=base,
                    hyperparameters={"n_epochs": 10_000, "batch_size": 1})
    long = api.fine_tuning.jobs.create(**settings, extra_headers={"Idempotency-Key": "try-1"})
    assert long.fine_tuned_model is None and long.model == base
    # its retry (a lost reply) is the same job, not a second one past the quota of 1
    again = api.fine_tuning.jobs.create(**settings, extra_headers={"Idempotency-Key": "try-1"})
    assert again.id == long.id
    with pytest.raises(openai.BadRequestError, match="'try-1' was used by another CreateJob"):
        api.fine_tuning.jobs.create(**{**settings, "seed": 5},
                                    extra_headers={"Idempotency-Key": "try-1"})
    with pytest.raises(openai.RateLimitError, match="max_concurrent_jobs quota is 1"):
        api.fine_tuning.jobs.create(training_file=file.id, model=base)
    assert api.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    assert finished(api, long.id).status == "cancelled"
    assert "Fine-tuning job cancelled" in [
        e.message for e in api.fine_tuning.jobs.list_events(long.id).data]


def test_an_unknown_file_model_or_job_is_404_naming_it(server, tokens):
    api = client(server, tokens["globex"])
    base = api.models.list().data[0].id
    with pytest.raises(openai.NotFoundError) as caught:
        api.fine_tuning.jobs.create(training_file="file-" + "0" * 24, model=base)
    assert caught.value.body["param"] == "training_file"
    file = upload(api)
    with pytest.raises(openai.NotFoundError) as caught:
        api.fine_tuning.jobs.create(training_file=file.id, model="no-such-adapter")
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.retrieve("job-0000000000000000")
    with pytest.raises(openai.BadRequestError, match="learning_rate_multiplier -1 not accepted"):
        api.fine_tuning.jobs.create(training_file=file.id, model=base,
                                    hyperparameters={"learning_rate_multiplier": -1})
