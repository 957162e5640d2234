"""The Prometheus metrics of a real `cotune serve`, scraped over HTTP after real calls: each
family counts what the calls did, and adapter labels stay bounded."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file
from server_helpers import running_server, tiny_adapter_dir
from wire import Caller

from cotune.client import Client
from cotune.v1 import inference_pb2, training_pb2

pytestmark = pytest.mark.slow

TRAINING_DATA = "\n".join(json.dumps({"prompt": f"the cat {i}", "completion": " sat on the mat"})
                          for i in range(4)).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of every sample."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, items), v in samples.items()
               if n == name and set(labels.items()) <= set(items))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    port = free_port()
    # jobs train in the serving steps (their lane's metrics: test_training_lane.py)
    with running_server(root, "--metrics-port", str(port), "--metrics-top-adapters", "2",
                        "--training-threads", "0") as s:
        admin = Caller(s.address, s.admin_token)
        token = admin.new_tenant("metered", max_queued_requests=1)
        yield s, port, admin, Caller(s.address, token), root
        admin.close()


def test_generations_count_requests_tokens_latency_steps_and_adapter_loads(served):
    server, port, admin, _, root = served
    admin.upload("first", tiny_adapter_dir(root / "first", seed=1))
    before = scrape(port)
    responses = admin.generate(adapter="first", max_tokens=5)
    after = scrape(port)
    tokens = sum(len(r.token_ids) for r in responses)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # a gRPC call: protocol "grpc" (tests/test_http_generation.py counts HTTP calls)
    ok = dict(tenant="admin", adapter="first", status="OK", protocol="grpc")
    assert grew("cotune_requests_total", **ok) == 1
    call = dict(tenant="admin", protocol="grpc")
    assert grew("cotune_generated_tokens_total", adapter="first", **call) == tokens == 5
    assert grew("cotune_prompt_tokens_total", adapter="first", **call) > 0
    assert grew("cotune_time_to_first_token_seconds_count", **call) == 1
    assert grew("cotune_inter_token_latency_seconds_count", **call) == 4
    assert grew("cotune_request_duration_seconds_count", **call) == 1
    assert grew("cotune_step_tokens_total", kind="decode") >= 4
    assert grew("cotune_step_tokens_total", kind="prefill") > 0
    assert grew("cotune_step_duration_seconds_count") >= 5
    assert grew("cotune_adapter_loads_total") == 1
    assert grew("cotune_adapter_load_duration_seconds_count") == 1
    # Its disk->host read, and the host cache that now holds it (float32 A and B, as on disk).
    assert grew("cotune_adapter_host_load_duration_seconds_count") == 1
    assert grew("cotune_adapter_host_cache_adapters") == 1
    weights = load_file(root / "first" / "adapter_model.safetensors")
    assert grew("cotune_adapter_host_cache_bytes") == sum(t.numel() * 4 for t in weights.values())
    assert grew("cotune_slo_requests_total", tenant="admin", kind="both") == 1
    assert value(after, "cotune_adapter_slots_used") >= 1
    assert value(after, "cotune_adapter_slots") == 8
    assert 0 <= value(after, "cotune_kv_cache_usage_ratio") <= 1
    assert value(after, "cotune_requests_in_flight", **call) == 0


def test_refusals_count_by_status_and_rejections_by_reason(served):
    server, port, admin, metered, root = served
    before = scrape(port)
    with pytest.raises(grpc.RpcError):
        metered.generate(adapter="missing")
    # Two at once for a tenant whose quota is one generation in flight.
    stream = metered.inference.Generate(inference_pb2.GenerateRequest(
        prompt="the cat", sampling={"max_tokens": 200}), metadata=metered.metadata)
    next(stream)
    with pytest.raises(grpc.RpcError) as refused:
        metered.generate(max_tokens=2)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    stream.cancel()
    after = scrape(port)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("cotune_requests_total", tenant="metered", status="NOT_FOUND") == 1
    assert grew("cotune_requests_total", tenant="metered", status="RESOURCE_EXHAUSTED") == 1
    assert grew("cotune_admission_rejections_total", tenant="metered",
                reason="tenant_queue", protocol="grpc") == 1


def test_a_job_counts_steps_tokens_loss_and_its_end(served):
    server, port, admin, _, root = served
    job = admin.create_job("trained", TRAINING_DATA, max_steps=3, batch_size=2)
    states = [e.state for e in admin.watch(job.id) if e.WhichOneof("event") == "state"]
    assert states[-1] == training_pb2.JOB_STATE_SUCCEEDED
    samples = scrape(port)
    labels = dict(tenant="admin", adapter="trained")
    assert value(samples, "cotune_job_steps_total", **labels) == 3
    assert value(samples, "cotune_training_tokens_total", **labels) > 0
    assert value(samples, "cotune_step_tokens_total", kind="training") > 0
    assert value(samples, "cotune_step_tokens_total", kind="backward") == value(
        samples, "cotune_step_tokens_total", kind="training")  # every forwarded token, once
    training_s = value(samples, "cotune_step_training_seconds_total")
    assert 0 < training_s <= value(samples, "cotune_step_duration_seconds_sum")
    assert value(samples, "cotune_training_pass_duration_seconds_count") == 0
    assert value(samples, "cotune_jobs_finished_total", tenant="admin", state="succeeded") == 1
    assert not [k for k in samples if k[0] == "cotune_job_loss" and ("adapter", "trained") in k[1]]


def test_adapter_labels_name_the_busiest_few_and_call_the_rest_other(served):
    server, port, admin, _, root = served
    for name in ("second", "third"):
        admin.upload(name, tiny_adapter_dir(root / name, seed=len(name)))
        admin.generate(adapter=name, max_tokens=1)
    adapters = {dict(items).get("adapter") for (n, items) in scrape(port)
                if n == "cotune_requests_total" and dict(items)["tenant"] == "admin"}
    # --metrics-top-adapters 2: "first" and "trained" (the job's) took the two names.
    assert adapters == {"first", "other"}


def test_open_rl_sessions_are_counted_apart_from_jobs(served):
    server, port, *_ = served
    with Client(server.address, server.admin_token) as client:
        session = client.sessions.create("metered-policy", rank=4, alpha=8)
        opened = scrape(port)
        session.close()
    assert value(opened, "cotune_rl_sessions_open") == 1
    assert value(opened, "cotune_jobs_running") == 0  # a session is no job
    deadline = time.monotonic() + 10  # the engine lets go of it at its next step boundary
    while value(scrape(port), "cotune_rl_sessions_open") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert value(scrape(port), "cotune_rl_sessions_open") == 0
