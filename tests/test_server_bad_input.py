"""Bad input at every RPC of a real `cotune serve`: each refusal has the status code of the wire
contract and a message that says what is accepted, leaves nothing half-created (no adapter, no
blob, no staged upload, no job), and the server goes on serving other tenants."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from conftest import CHATML, tiny_tokenizer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file
from server_helpers import running_server, tiny_adapter_dir
from wire import Caller

from cotune.server.errors import RpcError
from cotune.server.inference_service import InferenceService
from cotune.v1 import adapters_pb2, common_pb2, inference_pb2, tenants_pb2, training_pb2

pytestmark = pytest.mark.slow

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
PRECONDITION, DENIED = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
NAME_RULE = "accepted: 'name', 'name@vK' or 'name@K'"
BAD_REFERENCES = ["", "x" * 10_000, "x" * 100_000, "a@vx", "../x", "a/b", "a b", "-a"]
DATA = b'{"prompt": "the cat", "completion": " sat on the mat"}\n' * 4
VOCAB, CONTEXT, MAX_RANK = 320, 256, 16  # the tiny model of server_helpers, its --max-rank


def shown(text: str) -> str:
    return f"{len(text)} chars" if len(text) > 20 else text or "empty"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    (root / "allowed").mkdir()
    with running_server(root, "--allow-path", str(root / "allowed")) as running:
        running.root = root
        yield running


@pytest.fixture(scope="module")
def alice(server, admin):
    """The tenant that sends the bad input; she owns one good adapter, "kept"."""
    caller = Caller(server.address, admin.new_tenant("alice"))
    caller.upload("kept", tiny_adapter_dir(server.root / "kept", seed=1))
    yield caller
    caller.close()


@pytest.fixture(scope="module")
def bob(server, admin):
    """Another tenant, who only asks for ordinary things."""
    caller = Caller(server.address, admin.new_tenant("bob"))
    yield caller
    caller.close()


@pytest.fixture(scope="module")
def adapter_files(server) -> dict[str, bytes]:
    """The files of a good rank-4 adapter (q_proj, v_proj), to spoil one at a time."""
    path = server.root / "kept"
    return {CONFIG: (path / CONFIG).read_bytes(), WEIGHTS: (path / WEIGHTS).read_bytes()}


def refusal(call, code: grpc.StatusCode, *fragments: str) -> str:
    """Runs `call`, which must fail with `code` and a message holding every fragment."""
    with pytest.raises(grpc.RpcError) as raised:
        result = call()
        if hasattr(result, "__next__"):  # a response stream fails when read
            list(result)
    error = raised.value
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in error.details()
    return error.details()


def header(name: str = "spoilt", **fields) -> adapters_pb2.CreateAdapterRequest:
    return adapters_pb2.CreateAdapterRequest(
        header=adapters_pb2.CreateAdapterHeader(name=name, **fields))


def chunk(path: str, data: bytes) -> adapters_pb2.CreateAdapterRequest:
    return adapters_pb2.CreateAdapterRequest(chunk=common_pb2.FileChunk(path=path, data=data))


def adapter_names(caller: Caller) -> set[str]:
    response = caller.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(page_size=1000),
                                            metadata=caller.metadata)
    return {a.name for a in response.adapters}


def blobs(server) -> set[str]:
    return {p.name for p in (server.data_dir / "blobs").iterdir() if not p.name.startswith(".")}


@contextmanager
def leaves_nothing(server, caller: Caller):
    """The refusals in the block create no adapter and no blob, and leave no staged upload."""
    names, stored = adapter_names(caller), blobs(server)
    yield
    assert adapter_names(caller) == names
    assert blobs(server) == stored
    assert os.listdir(server.data_dir / "uploads") == []


# --- names and references --------------------------------------------------------------------

@pytest.mark.parametrize("reference", BAD_REFERENCES, ids=shown)
def test_an_invalid_adapter_reference_is_refused_by_every_call_that_takes_one(alice, reference):
    md, a = alice.metadata, alice.adapters
    calls = {
        "GetAdapter": lambda: a.GetAdapter(adapters_pb2.GetAdapterRequest(name=reference),
                                           metadata=md),
        "ListVersions": lambda: a.ListVersions(
            adapters_pb2.ListVersionsRequest(name=reference), metadata=md),
        "DeleteAdapter": lambda: a.DeleteAdapter(
            adapters_pb2.DeleteAdapterRequest(name=reference), metadata=md),
        "ExportAdapter": lambda: a.ExportAdapter(
            adapters_pb2.ExportAdapterRequest(name=reference), metadata=md),
        "CreateAdapter": lambda: a.CreateAdapter(iter([header(reference)]), metadata=md),
        "CreateJob": lambda: alice.training.CreateJob(
            training_pb2.CreateJobRequest(adapter=reference, training_data=DATA), metadata=md),
    }
    if reference:  # "" is the base model in Generate
        calls["Generate"] = lambda: alice.inference.Generate(
            inference_pb2.GenerateRequest(prompt="hi", adapter=reference), metadata=md)
    for name, call in calls.items():
        message = refusal(call, INVALID, NAME_RULE)
        assert len(message) < 1100, name  # a huge name is cut from the message, not echoed


def test_version_zero_and_versions_where_only_a_name_is_taken_are_refused(alice):
    md, a = alice.metadata, alice.adapters
    refusal(lambda: a.ExportAdapter(adapters_pb2.ExportAdapterRequest(name="kept@v0"),
                                    metadata=md), INVALID, "versions count from 1")
    refusal(lambda: a.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(name="kept@0"),
                                    metadata=md), INVALID, "versions count from 1")
    for call in (lambda: a.GetAdapter(adapters_pb2.GetAdapterRequest(name="kept@v1"),
                                      metadata=md),
                 lambda: a.ListVersions(adapters_pb2.ListVersionsRequest(name="kept@v1"),
                                        metadata=md),
                 lambda: a.CreateAdapter(iter([header("kept@v1")]), metadata=md)):
        refusal(call, INVALID, "this call takes an adapter name only")
    assert adapter_names(alice) == {"kept"}


@pytest.mark.parametrize("reference", ["nope", "kept@v9"])
def test_an_unknown_adapter_or_version_is_not_found(alice, reference):
    md, a = alice.metadata, alice.adapters
    calls = [
        lambda: a.ExportAdapter(adapters_pb2.ExportAdapterRequest(name=reference), metadata=md),
        lambda: a.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(name=reference), metadata=md),
        lambda: alice.inference.Generate(
            inference_pb2.GenerateRequest(prompt="hi", adapter=reference), metadata=md),
    ]
    if "@" not in reference:
        calls += [
            lambda: a.GetAdapter(adapters_pb2.GetAdapterRequest(name=reference), metadata=md),
            lambda: a.ListVersions(adapters_pb2.ListVersionsRequest(name=reference),
                                   metadata=md)]
    for call in calls:
        refusal(call, NOT_FOUND, "not found")
    assert adapter_names(alice) == {"kept"}


# --- CreateAdapter: the stream, the files, the fit to the base ---------------------------------

def spoilt_uploads(files: dict[str, bytes]) -> dict:
    """name -> (messages after a header, status code, fragments of the message)."""
    good = [chunk(CONFIG, files[CONFIG]), chunk(WEIGHTS, files[WEIGHTS])]
    config = json.loads(files[CONFIG])
    return {
        "header twice": ([header(), *good], INVALID, "one header, then file chunks only"),
        "a path out of the directory": ([chunk("../../etc/passwd", b"x"), *good], INVALID,
                                        "accepted: adapter_config.json, "
                                        "adapter_model.safetensors"),
        "a pickle file name": ([*good, chunk("model.bin", b"\x80\x04")], INVALID,
                               "'model.bin' not accepted"),
        "a file in two runs": ([chunk(CONFIG, files[CONFIG][:20]), chunk(WEIGHTS, files[WEIGHTS]),
                                chunk(CONFIG, files[CONFIG][20:])], INVALID, "two runs"),
        "no weights": ([chunk(CONFIG, files[CONFIG])], INVALID,
                       "lacks adapter_model.safetensors"),
        "no files": ([], INVALID, "lacks adapter_config.json, adapter_model.safetensors"),
        "config not JSON": ([chunk(CONFIG, b"{r: 4"), good[1]], INVALID,
                            "invalid adapter_config.json", "accepted: a JSON object"),
        "config a JSON list": ([chunk(CONFIG, json.dumps([config]).encode()), good[1]], INVALID,
                               "not a JSON object"),
        "config not UTF-8": ([chunk(CONFIG, b'{"r": "\xff\xfe"}'), good[1]], INVALID,
                             "invalid adapter_config.json", "utf-8"),
        "weights random bytes": ([good[0], chunk(WEIGHTS, os.urandom(4096))], INVALID,
                                 "not a valid safetensors file"),
        "weights a pickle": ([good[0], chunk(WEIGHTS, pickle.dumps({"w": [0.5]}, protocol=4))],
                             INVALID, "is a pickle", "never unpickles"),
    }


@pytest.mark.parametrize("case", [
    "header twice", "a path out of the directory", "a pickle file name", "a file in two runs",
    "no weights", "no files", "config not JSON", "config a JSON list", "config not UTF-8",
    "weights random bytes", "weights a pickle"])
def test_a_spoilt_upload_is_refused_and_leaves_nothing(server, alice, adapter_files, case):
    messages, code, *fragments = spoilt_uploads(adapter_files)[case]
    with leaves_nothing(server, alice):
        message = refusal(lambda: alice.adapters.CreateAdapter(
            iter([header(), *messages]), metadata=alice.metadata), code, *fragments)
    assert str(server.data_dir) not in message  # the staging directory is the server's own


def test_create_adapter_without_a_header_first_is_refused(server, alice, adapter_files):
    with leaves_nothing(server, alice):
        for messages in ([], [chunk(CONFIG, adapter_files[CONFIG])]):
            refusal(partial(alice.adapters.CreateAdapter, iter(messages),
                            metadata=alice.metadata),
                    INVALID, "the first message of CreateAdapter must be its header")


def upload_of(path) -> list:
    return [header(), chunk(CONFIG, (path / CONFIG).read_bytes()),
            chunk(WEIGHTS, (path / WEIGHTS).read_bytes())]


def test_an_adapter_of_rank_above_max_rank_does_not_fit(server, alice, tmp_path):
    wide = tiny_adapter_dir(tmp_path / "wide", seed=2, r=2 * MAX_RANK)
    with leaves_nothing(server, alice):
        message = refusal(lambda: alice.adapters.CreateAdapter(
            iter(upload_of(wide)), metadata=alice.metadata), PRECONDITION,
            f"rank {2 * MAX_RANK}", f"max_rank {MAX_RANK}", f"--max-rank {2 * MAX_RANK}")
    assert str(server.data_dir) not in message


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def large_adapter(path: Path, rank: int) -> Path:
    """The tiny adapter of `tiny_adapter_dir` at rank `rank`: small random weights (its
    delta well within bounds), 1792 bytes of them per unit of rank (q_proj and v_proj of two
    layers, 64 features in, 64 and 32 out)."""
    tiny_adapter_dir(path)
    config = json.loads((path / CONFIG).read_text())
    (path / CONFIG).write_text(json.dumps(dict(config, r=rank, lora_alpha=rank)))
    save_file({key: 0.01 * (torch.randn(rank, tensor.shape[1]) if "lora_A" in key
                            else torch.randn(tensor.shape[0], rank))
               for key, tensor in load_file(path / WEIGHTS).items()}, path / WEIGHTS)
    return path


def test_an_adapter_of_rank_above_max_rank_is_refused_having_read_only_its_header(
        server, alice, tmp_path):
    """107 MB of weights at rank 60000: the server refuses them reading the header alone (its
    peak memory grew by about four times the upload when it read the file whole first)."""
    big = large_adapter(tmp_path / "big", rank=60_000)
    size = (big / WEIGHTS).stat().st_size
    assert size > 100 << 20

    def messages():  # in chunks of 1 MiB, as the SDK sends them
        yield header("big")
        for name in (CONFIG, WEIGHTS):
            with open(big / name, "rb") as f:
                while data := f.read(1 << 20):
                    yield chunk(name, data)

    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from now
    before = peak_rss_kib(pid)
    with leaves_nothing(server, alice):
        refusal(lambda: alice.adapters.CreateAdapter(messages(), metadata=alice.metadata,
                                                     timeout=120),
                PRECONDITION, "rank 60000", f"max_rank {MAX_RANK}")
    grown = (peak_rss_kib(pid) - before) << 10
    assert grown < size // 2, f"the server's peak memory grew by {grown >> 20} MiB"


@pytest.mark.parametrize("hostile, fragments", [
    ("lora_alpha 1e308", ("has lora_alpha=1e+308", "accepted: a finite number of at most "
                          "100000 in magnitude")),
    ("weights x 1e30", ("delta (scale x lora_B @ lora_A) with an entry of",
                        "accepted: entries of at most 1000")),
])
def test_a_numerically_hostile_adapter_is_refused_and_everyone_is_served(
        server, alice, bob, tmp_path, hostile, fragments):
    path = tiny_adapter_dir(tmp_path / "hostile", seed=3)
    if hostile == "lora_alpha 1e308":
        config = json.loads((path / CONFIG).read_text())
        (path / CONFIG).write_text(json.dumps(dict(config, lora_alpha=1e308)))
    else:
        save_file({key: tensor * (1e30 if "lora_B" in key else 1.0)
                   for key, tensor in load_file(path / WEIGHTS).items()}, path / WEIGHTS)
    with leaves_nothing(server, alice):
        refusal(lambda: alice.adapters.CreateAdapter(iter(upload_of(path)),
                                                     metadata=alice.metadata),
                INVALID, *fragments)
    assert bob.tokens_of(bob.generate(max_tokens=4))
    assert alice.tokens_of(alice.generate(adapter="kept", max_tokens=4))
    health = health_pb2_grpc.HealthStub(bob.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_an_adapter_for_modules_the_base_lacks_or_of_other_shapes_does_not_fit(
        server, alice, tmp_path):
    lacking = tiny_adapter_dir(tmp_path / "lacking", seed=3)
    config = json.loads((lacking / CONFIG).read_text())
    (lacking / CONFIG).write_text(json.dumps(dict(config, target_modules=["w_gate"])))

    shaped = tiny_adapter_dir(tmp_path / "shaped", seed=4)
    tensors = load_file(shaped / WEIGHTS)
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.randn(4, 32)  # the base's q_proj takes 64 features
    save_file(tensors, shaped / WEIGHTS)

    extra = tiny_adapter_dir(tmp_path / "extra", seed=5)
    tensors = load_file(extra / WEIGHTS)
    layer = "base_model.model.model.layers.7.self_attn.q_proj"  # the base has 2 layers
    tensors |= {f"{layer}.lora_A.weight": torch.randn(4, 64),
                f"{layer}.lora_B.weight": torch.randn(64, 4)}
    save_file(tensors, extra / WEIGHTS)

    with leaves_nothing(server, alice):
        for path, fragments in (
                (lacking, ["'w_gate' which the base model does not have", "q_proj"]),
                (shaped, ["has shape (4, 32)", "in_features=64"]),
                (extra, ["layers.7.self_attn.q_proj' which the base model does not have"])):
            refusal(partial(alice.adapters.CreateAdapter, iter(upload_of(path)),
                            metadata=alice.metadata), PRECONDITION, *fragments)


def health_status(caller: Caller) -> int:
    return health_pb2_grpc.HealthStub(caller.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10).status


def test_a_config_regex_that_would_backtrack_is_refused_at_once_and_health_serves(
        server, alice, adapter_files):
    # Python's re took 75 s on this one; the deadline (not a timing) is against a hang
    bomb = r"model\.layers\.\d+\.(?=s)(.*.*)*Z"
    config = dict(json.loads(adapter_files[CONFIG]), target_modules=bomb)
    upload = [header(), chunk(CONFIG, json.dumps(config).encode()),
              chunk(WEIGHTS, adapter_files[WEIGHTS])]
    with leaves_nothing(server, alice):
        refusal(lambda: alice.adapters.CreateAdapter(iter(upload), metadata=alice.metadata,
                                                     timeout=30),
                INVALID, f"invalid regex in target_modules: {bomb!r}", "RE2 syntax")
    assert health_status(alice) == health_pb2.HealthCheckResponse.SERVING


def test_server_path_needs_an_admin_and_a_directory_under_allow_path(server, alice, admin):
    outside = tiny_adapter_dir(server.root / "outside", seed=6)
    allowed = server.root / "allowed"
    shutil.copytree(outside, allowed / "inside")
    with leaves_nothing(server, alice):
        refusal(lambda: alice.adapters.CreateAdapter(
            iter([header(server_path=str(allowed / "inside"))]), metadata=alice.metadata),
            DENIED, "server_path needs an admin token")

    os.symlink(outside, allowed / "link")
    with leaves_nothing(server, admin):
        for path, fragment in ((allowed / ".." / "outside", "outside the allowed directories"),
                               (allowed / "link", "outside the allowed directories"),
                               (allowed / "missing", "does not exist"),
                               (server.data_dir / "blobs", "outside the allowed directories")):
            refusal(partial(admin.adapters.CreateAdapter, iter([header(server_path=str(path))]),
                            metadata=admin.metadata), INVALID, fragment)

    # the same files under the allowed root are accepted
    version = admin.adapters.CreateAdapter(
        iter([header("inside", server_path=str(allowed / "inside"))]), metadata=admin.metadata)
    assert (version.name, version.provenance.source) == ("inside", "server_path")


# --- Generate and Abort ---------------------------------------------------------------------

def sampled(prompt: str = "the cat", **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(prompt=prompt,
                                         sampling=inference_pb2.SamplingParams(**sampling))


def ids(*values: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(prompt_token_ids=inference_pb2.TokenIds(ids=values))


def chat(*messages: tuple[str, str]) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(chat=inference_pb2.ChatMessages(messages=[
        inference_pb2.ChatMessage(role=role, content=content) for role, content in messages]))


BAD_GENERATE = {
    "no input": (inference_pb2.GenerateRequest(),
                 "no input; set prompt, prompt_token_ids or chat"),
    "a chat of no messages": (chat(), "chat has no messages"),
    "a chat role the template has no turn for": (
        chat(("tool", "x")), "chat.messages[0].role is 'tool'; accepted: system, user, assistant"),
    "empty prompt": (inference_pb2.GenerateRequest(prompt=""), "prompt is empty"),
    "no token ids": (ids(), f"non-empty list of ids in [0, {VOCAB})"),
    "token id = vocab": (ids(5, VOCAB), f"in [0, {VOCAB}); got {VOCAB}"),
    "token id -1": (ids(-1), "got -1"),
    "max_tokens -1": (sampled(max_tokens=-1),
                      "max_tokens -1 not accepted; accepted: 1 or more, or 0 for as many"),
    "max_tokens 2**31-1": (sampled(max_tokens=2**31 - 1),
                           f"exceeds the model's context of {CONTEXT}"),
    "past the context": (inference_pb2.GenerateRequest(
        prompt_token_ids=inference_pb2.TokenIds(ids=[7] * 10),
        sampling=inference_pb2.SamplingParams(max_tokens=CONTEXT - 9)),
        f"prompt of 10 tokens plus max_tokens {CONTEXT - 9} exceeds the model's context"),
    "temperature -1": (sampled(temperature=-1), "temperature must be a finite number >= 0"),
    "temperature nan": (sampled(temperature=float("nan")),
                        "temperature must be a finite number >= 0"),
    "top_p 0": (sampled(top_p=0), "top_p must be in (0, 1]"),
    "top_p 2": (sampled(top_p=2), "top_p must be in (0, 1]"),
    "top_k -1": (sampled(top_k=-1), "top_k must be an integer >= 1, or 0"),
    "logprobs -1": (sampled(logprobs=-1), "logprobs must be None or an integer >= 0"),
    "logprobs > vocab": (sampled(logprobs=VOCAB + 1), "accepted: 0 to 20 (--max-logprobs)"),
    # a request asking for every alternative of every token delayed another tenant by 13 s
    "logprobs 21": (sampled(logprobs=21), "logprobs 21 asks for more alternatives than this "
                                          "server gives; accepted: 0 to 20 (--max-logprobs)"),
    "an empty stop string": (sampled(stop=[""]), "stop must be a list of non-empty strings"),
    # every response echoes the id: a megabyte of it was sent back with each token
    "request_id of 1 MB": (inference_pb2.GenerateRequest(prompt="hi", request_id="r" * (1 << 20)),
                           "(1048576 characters) not accepted; accepted: at most 256 printable"),
    "request_id of 257": (inference_pb2.GenerateRequest(prompt="hi", request_id="r" * 257),
                          "(257 characters) not accepted"),
    "request_id with a newline": (inference_pb2.GenerateRequest(prompt="hi", request_id="a\nb"),
                                  "request_id 'a\\nb' (3 characters) not accepted"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_a_bad_generate_request_is_invalid_and_others_are_still_served(alice, bob, case):
    # "logprobs > vocab" used to fail inside the engine's step, and so every request after it
    request_, fragment = BAD_GENERATE[case]
    refusal(lambda: alice.inference.Generate(request_, metadata=alice.metadata, timeout=30),
            INVALID, fragment)
    done = bob.generate(max_tokens=2)
    assert done[-1].usage.completion_tokens == 2


def test_a_request_id_in_flight_cannot_be_used_twice_by_its_tenant(alice, bob):
    md = alice.metadata
    long = sampled(max_tokens=200)
    long.request_id = "twice"
    first = alice.inference.Generate(long, metadata=md, timeout=60)
    assert next(first).request_id == "twice"  # it is running now
    refusal(lambda: alice.inference.Generate(inference_pb2.GenerateRequest(
        prompt="hi", request_id="twice"), metadata=md), grpc.StatusCode.ALREADY_EXISTS,
        "'twice' is already in flight; use a new request_id")
    aborted = alice.inference.Abort(inference_pb2.AbortRequest(request_id="twice"),
                                    metadata=md).aborted
    # The abort stops it when it comes in time; a fast machine may have made all 200 tokens.
    assert list(first)[-1].finish_reason == (inference_pb2.FINISH_REASON_ABORT if aborted
                                             else inference_pb2.FINISH_REASON_LENGTH)
    # another tenant's id space is its own, and the id is free again once the request ended
    assert bob.generate(max_tokens=2, request_id="twice")[-1].usage.completion_tokens == 2
    assert alice.generate(max_tokens=2, request_id="twice")[-1].request_id == "twice"


def test_a_request_id_of_256_printable_characters_is_echoed(alice):
    request_id = "é" * 255 + "~"
    assert {r.request_id for r in alice.generate(max_tokens=2, request_id=request_id)} \
        == {request_id}


def test_abort_needs_a_request_id(alice):
    refusal(lambda: alice.inference.Abort(inference_pb2.AbortRequest(), metadata=alice.metadata),
            INVALID, "request_id is empty")
    assert not alice.inference.Abort(inference_pb2.AbortRequest(request_id="none"),
                                     metadata=alice.metadata).aborted


# --- listing ---------------------------------------------------------------------------------

def forged(after) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()


@pytest.mark.parametrize("page_token", [
    "garbage", "!!!", "é", base64.urlsafe_b64encode(b"[1]").decode(), forged([1]),
    forged({"a": 1}), forged(None), forged(True)])
def test_a_page_token_the_server_did_not_give_is_refused_by_every_list(alice, admin, page_token):
    md = alice.metadata
    for call in (
            lambda: alice.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(
                page_token=page_token), metadata=md),
            lambda: alice.adapters.ListVersions(adapters_pb2.ListVersionsRequest(
                name="kept", page_token=page_token), metadata=md),
            lambda: alice.training.ListJobs(training_pb2.ListJobsRequest(
                page_token=page_token), metadata=md),
            lambda: admin.tenants.ListTenants(tenants_pb2.ListTenantsRequest(
                page_token=page_token), metadata=admin.metadata)):
        refusal(call, INVALID, "page_token is not one this server gave")


@pytest.mark.parametrize("page_size", [-1, 1001, 5000])
def test_a_page_size_out_of_range_is_refused(alice, page_size):
    for call in (
            lambda: alice.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(
                page_size=page_size), metadata=alice.metadata),
            lambda: alice.adapters.ListVersions(adapters_pb2.ListVersionsRequest(
                name="kept", page_size=page_size), metadata=alice.metadata),
            lambda: alice.training.ListJobs(training_pb2.ListJobsRequest(
                page_size=page_size), metadata=alice.metadata)):
        refusal(call, INVALID, f"page_size {page_size} not accepted", "to 1000")


# --- jobs ------------------------------------------------------------------------------------

def job(**fields) -> training_pb2.CreateJobRequest:
    fields.setdefault("adapter", "tuned")
    return training_pb2.CreateJobRequest(**fields)


BAD_JOBS = {
    "no data": (job(), INVALID, ["the job has no data; set training_file"]),
    "empty data": (job(training_data=b""), INVALID,
                   ["training_data is empty", '{"prompt", "completion"}']),
    "data not JSONL": (job(training_data=b"this is not JSON\n"), INVALID,
                       ["training_data:1: invalid JSON", "one JSON object"]),
    "data of lists": (job(training_data=b"[1, 2]\n"), INVALID,
                      ["training_data:1: a JSON list is not an object"]),
    "data not UTF-8": (job(training_data=b"\xff\xfe\n"), INVALID, ["training_data:1: not UTF-8"]),
    "unknown target": (job(training_data=DATA, lora=training_pb2.LoraConfig(
        target_modules=["w_gate"])), INVALID, ["targets ['w_gate'] not accepted", "q_proj"]),
    "rank 0": (job(training_data=DATA, lora=training_pb2.LoraConfig(rank=0)), INVALID,
               ["rank 0 not accepted; accepted: a whole number from 1 to 1024"]),
    "alpha 1e308": (job(training_data=DATA, lora=training_pb2.LoraConfig(alpha=1e308)), INVALID,
                    ["alpha 1e+308 not accepted; accepted: a number in (0, 100000]"]),
    "lr 1e38": (job(training_data=DATA, optimizer=training_pb2.OptimizerConfig(lr=1e38)),
                INVALID, ["lr 1e+38 not accepted; accepted: a number in (0, 1]"]),
    "weight_decay -1": (job(training_data=DATA, optimizer=training_pb2.OptimizerConfig(
        weight_decay=-1)), INVALID, ["weight_decay -1.0 not accepted; accepted: a number in "
                                    "[0, 1]"]),
    # its steps overflowed the int32 of Job.total_steps: the job stayed running forever
    "epochs 1e9": (job(training_data=DATA, epochs=10**9), INVALID,
                   ["epochs 1000000000 not accepted; accepted: a whole number from 1 to 10000"]),
    "max_steps -1": (job(training_data=DATA, max_steps=-1), INVALID,
                     ["max_steps -1 not accepted; accepted: a whole number from 1 to 2147483647"]),
    "grad_accumulation 1e6": (job(training_data=DATA, grad_accumulation=10**6), INVALID,
                              ["grad_accumulation 1000000 not accepted"]),
    "max_length 0": (job(training_data=DATA, max_length=0), INVALID,
                     ["max_length 0 not accepted; accepted: a whole number from 1 to 1048576"]),
    "warmup_steps -1": (job(training_data=DATA, warmup_steps=-1), INVALID,
                        ["warmup_steps -1 not accepted"]),
    "checkpoint_every -1": (job(training_data=DATA, checkpoint_every=-1), INVALID,
                            ["checkpoint_every -1 not accepted"]),
    "eval_fraction 1": (job(training_data=DATA, eval_fraction=1.0), INVALID,
                        ["eval_fraction 1.0 not accepted; accepted: a number in [0, 1)"]),
    "rank above max_rank": (job(training_data=DATA, lora=training_pb2.LoraConfig(
        rank=2 * MAX_RANK)), PRECONDITION, [f"max_rank {MAX_RANK}"]),
    "unknown schedule": (job(training_data=DATA, schedule="sometimes"), INVALID,
                         ["constant, linear, cosine"]),
    "batch_size 0": (job(training_data=DATA, batch_size=0), INVALID,
                     ["batch_size 0 not accepted; accepted: a whole number from 1 to 4096"]),
    "a version": (job(adapter="tuned@v2", training_data=DATA), INVALID,
                  ["an adapter name only"]),
    "an invalid name": (job(adapter="../tuned", training_data=DATA), INVALID, [NAME_RULE]),
    "server_path of a tenant": (job(server_path="/etc/passwd"), DENIED,
                                ["server_path needs an admin token"]),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_a_bad_job_is_refused_and_leaves_no_job_running_or_data_behind(server, alice, case):
    request_, code, fragments = BAD_JOBS[case]
    message = refusal(lambda: alice.training.CreateJob(request_, metadata=alice.metadata),
                      code, *fragments)
    assert str(server.data_dir) not in message
    jobs = alice.training.ListJobs(training_pb2.ListJobsRequest(), metadata=alice.metadata).jobs
    assert {j.state for j in jobs} <= {training_pb2.JOB_STATE_FAILED}
    jobs_dir = server.data_dir / "jobs"
    assert not jobs_dir.exists() or os.listdir(jobs_dir) == []
    assert adapter_names(alice) == {"kept"}


def test_an_admins_job_data_path_must_lie_under_allow_path(server, admin):
    (server.root / "data.jsonl").write_bytes(DATA)
    for path, fragment in ((server.root / "allowed" / ".." / "data.jsonl", "outside the allowed"),
                           (server.root / "allowed" / "none.jsonl", "does not exist")):
        refusal(partial(admin.training.CreateJob, job(server_path=str(path)),
                        metadata=admin.metadata), INVALID, fragment)


@pytest.mark.parametrize("job_id", ["job-0000000000000000", "", "../x"])
def test_an_unknown_job_is_not_found(alice, job_id):
    md, t = alice.metadata, alice.training
    for call in (lambda: t.GetJob(training_pb2.GetJobRequest(id=job_id), metadata=md),
                 lambda: t.CancelJob(training_pb2.CancelJobRequest(id=job_id), metadata=md),
                 lambda: t.WatchJob(training_pb2.WatchJobRequest(id=job_id), metadata=md)):
        refusal(call, NOT_FOUND, "not found")


# --- tenants ---------------------------------------------------------------------------------

def test_tenant_service_refuses_a_tenant_that_is_not_an_admin(alice):
    md, n = alice.metadata, alice.tenants
    for call in (
            lambda: n.CreateTenant(tenants_pb2.CreateTenantRequest(name="mallory"), metadata=md),
            lambda: n.GetTenant(tenants_pb2.GetTenantRequest(name="alice"), metadata=md),
            lambda: n.ListTenants(tenants_pb2.ListTenantsRequest(), metadata=md),
            lambda: n.SetQuotas(tenants_pb2.SetQuotasRequest(name="alice"), metadata=md),
            lambda: n.IssueToken(tenants_pb2.IssueTokenRequest(tenant="admin"), metadata=md),
            lambda: n.RevokeToken(tenants_pb2.RevokeTokenRequest(id="x"), metadata=md),
            lambda: n.DeleteTenant(tenants_pb2.DeleteTenantRequest(name="bob"), metadata=md)):
        refusal(call, DENIED, "'alice' is not an admin")


@pytest.mark.parametrize("name", BAD_REFERENCES + ["a@v1"], ids=shown)
def test_an_invalid_tenant_name_is_refused(admin, name):
    message = refusal(lambda: admin.tenants.CreateTenant(tenants_pb2.CreateTenantRequest(
        name=name), metadata=admin.metadata), INVALID, "invalid tenant name",
        "accepted: 1-128 letters")
    assert len(message) < 1100


def test_tenant_service_refuses_duplicates_negative_quotas_and_unknown_tenants(admin):
    md, n = admin.metadata, admin.tenants
    refusal(lambda: n.CreateTenant(tenants_pb2.CreateTenantRequest(name="alice"), metadata=md),
            grpc.StatusCode.ALREADY_EXISTS, "'alice' already exists")
    negative = tenants_pb2.Quotas(max_adapters=1, max_tokens_per_minute=-5)
    refusal(lambda: n.SetQuotas(tenants_pb2.SetQuotasRequest(name="alice", quotas=negative),
                                metadata=md), INVALID, "max_tokens_per_minute", "negative",
            "0 (no limit) or a positive number")
    refusal(lambda: n.CreateTenant(tenants_pb2.CreateTenantRequest(name="carol", quotas=negative),
                                   metadata=md), INVALID, "negative")
    assert "carol" not in {t.name for t in n.ListTenants(tenants_pb2.ListTenantsRequest(),
                                                        metadata=md).tenants}
    assert n.GetTenant(tenants_pb2.GetTenantRequest(name="alice"),
                       metadata=md).quotas.max_adapters != 1
    for call in (lambda: n.GetTenant(tenants_pb2.GetTenantRequest(name="zed"), metadata=md),
                 lambda: n.SetQuotas(tenants_pb2.SetQuotasRequest(name="zed"), metadata=md),
                 lambda: n.IssueToken(tenants_pb2.IssueTokenRequest(tenant="zed"),
                                      metadata=md)):
        refusal(call, NOT_FOUND, "'zed' not found")


def test_revoking_an_unknown_token_is_not_found_and_a_revoked_one_says_so(admin):
    md, n = admin.metadata, admin.tenants
    refusal(lambda: n.RevokeToken(tenants_pb2.RevokeTokenRequest(id="000000000000"),
                                  metadata=md), NOT_FOUND, "token id '000000000000' not found")
    issued = n.IssueToken(tenants_pb2.IssueTokenRequest(tenant="alice"), metadata=md)
    revoke = tenants_pb2.RevokeTokenRequest(id=issued.id)
    assert n.RevokeToken(revoke, metadata=md).revoked
    assert not n.RevokeToken(revoke, metadata=md).revoked  # it was revoked already


# --- bytes that are not a message --------------------------------------------------------------

def raw(caller: Caller, method: str, kind: str = "unary_unary"):
    """A call that sends bytes as they are: what a client with a broken encoder sends."""
    return getattr(caller.channel, kind)(method, request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)


def test_a_string_field_of_invalid_utf8_is_invalid_argument(server, alice):
    bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (prompt, name), length 2, not UTF-8
    calls = {
        "Generate": lambda: raw(alice, "/cotune.v1.InferenceService/Generate", "unary_stream")(
            bad_utf8, metadata=alice.metadata, timeout=30),
        "GetAdapter": lambda: raw(alice, "/cotune.v1.AdapterService/GetAdapter")(
            bad_utf8, metadata=alice.metadata, timeout=30),
        "GetAdapter, not a message at all": lambda: raw(
            alice, "/cotune.v1.AdapterService/GetAdapter")(
            b"\xff\xff\xff", metadata=alice.metadata, timeout=30),
    }
    for call in calls.values():
        refusal(call, INVALID, "does not parse", "valid UTF-8")

    good_header = header("half").SerializeToString()
    bad_chunk = b"\x12\x06\x0a\x04\xff\xfe\xfd\xfc"  # chunk{path: not UTF-8}
    with leaves_nothing(server, alice):
        refusal(lambda: raw(alice, "/cotune.v1.AdapterService/CreateAdapter", "stream_unary")(
            iter([good_header, bad_chunk]), metadata=alice.metadata, timeout=30),
            INVALID, "does not parse")


# --- JSON nested too deeply ----------------------------------------------------------------

def test_json_nested_too_deeply_is_invalid_argument_wherever_it_is_read(
        server, alice, adapter_files):
    deep = "[" * 100_000 + "]" * 100_000
    nested = "JSON nested too deeply (more than 100 levels of arrays and objects); accepted: " \
             "at most 100 levels"
    config = json.dumps(json.loads(adapter_files[CONFIG]) | {"task_type": "@"})
    with leaves_nothing(server, alice):
        refusal(lambda: alice.adapters.CreateAdapter(iter([
            header(), chunk(CONFIG, config.replace('"@"', deep).encode()),
            chunk(WEIGHTS, adapter_files[WEIGHTS])]), metadata=alice.metadata),
            INVALID, "invalid adapter_config.json", nested)
    refusal(lambda: alice.training.CreateJob(job(training_data=f'{{"text": {deep}}}\n'.encode()),
                                             metadata=alice.metadata),
            INVALID, f"training_data:1: {nested}")
    refusal(lambda: alice.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(
        page_token=base64.urlsafe_b64encode(deep.encode()).decode()), metadata=alice.metadata),
        INVALID, "page_token is not one this server gave")
    assert health_status(alice) == health_pb2.HealthCheckResponse.SERVING


# --- after all of it -------------------------------------------------------------------------

def test_after_the_bad_input_the_server_serves_and_logged_no_server_fault(server, alice, bob):
    done = bob.generate(max_tokens=12)
    assert done[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert done[-1].usage.completion_tokens == 12
    assert alice.generate(adapter="kept", max_tokens=3)[0].adapter == "kept@v1"
    health = health_pb2_grpc.HealthStub(bob.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    faults = [line for line in server.output if " ERROR " in line or "Traceback" in line]
    assert faults == []
    assert server.proc.poll() is None


def _chat_service(chat_template: str | None):
    """An InferenceService whose runtime has only a tokenizer: enough to read a chat input."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = chat_template
    return InferenceService(None, None, SimpleNamespace(tokenizer=tokenizer), None,
                            inference_pb2.ModelInfo(name="tiny"), None, 20), tokenizer


def test_a_chat_is_rendered_by_the_models_template_with_the_assistants_turn_opened():
    service, tokenizer = _chat_service(CHATML)
    ids = service._prompt_ids(chat(("system", "be brief"), ("user", "hi")))
    assert tokenizer.decode(ids) == ("<|im_start|>system\nbe brief<|im_end|>\n"
                                     "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template, fragment", [
    (None, "the model 'tiny' has no chat template; send a prompt"),
    ("{{ raise_exception('roles must alternate') }}",
     "the model's chat template rejects this conversation: roles must alternate"),
])
def test_a_chat_the_model_cannot_render_is_invalid(template, fragment):
    service, _ = _chat_service(template)
    with pytest.raises(RpcError) as refused:
        service._prompt_ids(chat(("user", "hi")))
    assert refused.value.code == INVALID and fragment in refused.value.message
