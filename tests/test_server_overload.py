"""Overload on a real `cotune serve` with small limits: ten times the admitted load at once.
Refusals are RESOURCE_EXHAUSTED, immediate, and name the limit they hit (the tenant's quota or
the server's queue); every admitted request completes in full; other tenants are served.

The limits, from the top: gRPC's own cap on RPCs in flight (`maximum_concurrent_rpcs`, which
app.py sets to the rpc thread pool's size: --max-queued-requests + --max-open-streams + 16),
then the bound on calls a client may hold open (--max-open-streams: uploads, exports, job
watches; here one tenant may fill all but the place kept for admins: test_server_streams.py
covers each tenant's share and the idle timeout), admission's server-wide
--max-queued-requests, then each tenant's max_queued_requests and max_tokens_per_minute
quotas."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import running_server
from test_metrics import free_port, scrape, value
from wire import Caller

from cotune.server.admission import OpenStreams
from cotune.v1 import adapters_pb2, common_pb2, inference_pb2

pytestmark = pytest.mark.slow

SERVER_LIMIT, TENANT_LIMIT = 4, 2  # --max-queued-requests, --default-max-queued
OPEN_STREAMS = 16  # --max-open-streams, its default, and --max-open-streams-per-tenant
# app.py: the rpc threads, and gRPC's maximum_concurrent_rpcs: generations, calls held open,
# and 16 threads that only other calls take
RPC_LIMIT = SERVER_LIMIT + OPEN_STREAMS + 16
MAX_TOKENS = 128  # the tiny model has no EOS: an admitted request runs to max_tokens
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory, metrics_port):
    with running_server(tmp_path_factory.mktemp("overload"),
                        "--max-queued-requests", str(SERVER_LIMIT),
                        "--default-max-queued", str(TENANT_LIMIT),
                        "--max-open-streams-per-tenant", str(OPEN_STREAMS),
                        "--upload-idle-timeout", "300",  # held open below, idle on purpose
                        "--metrics-port", str(metrics_port)) as running:
        yield running


@pytest.fixture(scope="module")
def tenants(server, admin):
    """capped: its quota max_queued_requests=2; wide: no quota of its own, only the server's
    limit; other: the default quotas; metered: 60 tokens a minute."""
    callers = {
        "capped": Caller(server.address, admin.new_tenant("capped",
                                                          max_queued_requests=TENANT_LIMIT)),
        "wide": Caller(server.address, admin.new_tenant("wide", max_adapters=10,
                                                        max_queued_requests=0)),
        "other": Caller(server.address, admin.new_tenant("other")),
        "metered": Caller(server.address, admin.new_tenant("metered",
                                                           max_tokens_per_minute=60)),
    }
    yield callers
    for caller in callers.values():
        caller.close()


@dataclass
class Outcome:
    seconds: float
    responses: list | None = None
    error: grpc.RpcError | None = None

    @property
    def completed(self) -> bool:
        return self.responses is not None


def generate(caller: Caller, max_tokens: int = MAX_TOKENS, **fields) -> Outcome:
    request = inference_pb2.GenerateRequest(
        prompt=fields.pop("prompt", "the cat"),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, **fields))
    start = time.monotonic()
    try:
        responses = list(caller.inference.Generate(request, metadata=caller.metadata,
                                                   timeout=120))
        return Outcome(time.monotonic() - start, responses=responses)
    except grpc.RpcError as e:
        return Outcome(time.monotonic() - start, error=e)


def at_once(calls: list) -> list[Outcome]:
    """Runs every call in its own thread, released together."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def assert_complete(outcome: Outcome, max_tokens: int = MAX_TOKENS) -> None:
    assert outcome.completed, outcome.error.details()
    last = outcome.responses[-1]
    assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == max_tokens
    assert sum(len(r.token_ids) for r in outcome.responses) == max_tokens


def assert_refused_quickly(refused: list[Outcome], admitted: list[Outcome], *fragments: str):
    for outcome in refused:
        assert outcome.error.code() == EXHAUSTED, outcome.error.details()
        for fragment in fragments:
            assert fragment in outcome.error.details()
    # A refusal costs the server next to nothing: all of them are back before the first
    # admitted request finishes (and well under a second each, however loaded the machine).
    assert max(o.seconds for o in refused) < min(o.seconds for o in admitted)
    assert sorted(o.seconds for o in refused)[len(refused) // 2] < 1.0


def test_a_tenant_past_its_quota_is_refused_at_once_and_another_tenant_is_served(tenants):
    capped, other = tenants["capped"], tenants["other"]
    outcomes = at_once([lambda: generate(capped)] * (10 * TENANT_LIMIT)
                       + [lambda: generate(other)])
    served, flood = outcomes[-1], outcomes[:-1]
    admitted = [o for o in flood if o.completed]
    refused = [o for o in flood if not o.completed]
    print(f"capped: {len(admitted)} admitted in {[round(o.seconds, 2) for o in admitted]} s, "
          f"{len(refused)} refused in at most {max(o.seconds for o in refused):.3f} s")
    assert TENANT_LIMIT <= len(admitted) <= 2 * TENANT_LIMIT  # a second pair may slip in late
    assert len(refused) >= 8 * TENANT_LIMIT
    for outcome in admitted:
        assert_complete(outcome)
    # capped's 2 and other's 1 never fill the server's 4: every refusal is capped's quota
    assert_refused_quickly(refused, admitted, "tenant 'capped'", "max_queued_requests=2")
    assert_complete(served)


def test_past_the_server_limit_a_tenant_is_refused_and_told_it_is_the_servers_limit(tenants):
    wide, other = tenants["wide"], tenants["other"]
    flood = 10 * SERVER_LIMIT
    outcomes = at_once([lambda: generate(wide)] * flood)
    admitted = [o for o in outcomes if o.completed]
    refused = [o for o in outcomes if not o.completed]
    print(f"wide: {len(admitted)} admitted, {len(refused)} refused in at most "
          f"{max(o.seconds for o in refused):.3f} s: "
          f"{dict(Counter(o.error.details() for o in refused))}")
    assert SERVER_LIMIT <= len(admitted) <= 2 * SERVER_LIMIT
    for outcome in admitted:
        assert_complete(outcome)
    assert_refused_quickly(refused, admitted)
    # Admission refuses in the server's words. Only the calls past gRPC's cap on RPCs in
    # flight, if they all arrive before any refusal is out, are refused by gRPC itself.
    by_grpc = [o for o in refused if o.error.details() == "Concurrent RPC limit exceeded!"]
    assert len(by_grpc) <= flood - RPC_LIMIT
    for outcome in refused:
        if outcome not in by_grpc:
            assert "the server has 4 generations in flight, its limit (--max-queued-requests)" \
                in outcome.error.details()
    assert_complete(generate(other, max_tokens=4), max_tokens=4)  # the flood has passed


def test_a_bad_request_is_refused_as_bad_even_when_its_tenant_is_full(tenants):
    capped = tenants["capped"]
    long_running = [capped.inference.Generate(inference_pb2.GenerateRequest(
        prompt="the cat", sampling=inference_pb2.SamplingParams(max_tokens=200)),
        metadata=capped.metadata, timeout=120) for _ in range(TENANT_LIMIT)]
    try:
        for call in long_running:
            next(call)  # admitted and running
        assert generate(capped).error.code() == EXHAUSTED
        # a retry cannot make these succeed: they are INVALID_ARGUMENT, not RESOURCE_EXHAUSTED
        assert generate(capped, top_p=2.0).error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert generate(capped, max_tokens=10_000).error.code() \
            == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for call in long_running:
            call.cancel()
    # a cancelled call gives its place back
    deadline = time.monotonic() + 10
    while not (outcome := generate(capped, max_tokens=4)).completed \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_complete(outcome, max_tokens=4)


def test_a_tenant_past_its_tokens_per_minute_is_refused_and_others_are_served(tenants):
    metered, other = tenants["metered"], tenants["other"]
    # bad requests are refused before admission: their prompts use none of the quota
    for _ in range(5):
        long_prompt = " ".join(["the cat sat on the mat"] * 10)
        bad = generate(metered, prompt=long_prompt, max_tokens=16, temperature=-1.0)
        assert bad.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    used, outcomes = 0, []
    while len(outcomes) < 10:
        outcome = generate(metered, max_tokens=16)
        outcomes.append(outcome)
        if not outcome.completed:
            break
        assert_complete(outcome, max_tokens=16)
        used += outcome.responses[-1].usage.prompt_tokens + 16
    refused = outcomes[-1]
    assert not refused.completed, f"{len(outcomes)} requests, {used} tokens, none refused"
    assert refused.error.code() == EXHAUSTED
    assert "tenant 'metered'" in refused.error.details()
    assert "max_tokens_per_minute=60" in refused.error.details()
    assert used >= 60  # refused only once the quota was used up
    assert len(outcomes) >= 2
    assert_complete(generate(other, max_tokens=4), max_tokens=4)


def test_calls_held_open_past_their_bound_are_refused_and_health_and_generations_go_on(
        server, tenants, metrics_port):
    """Uploads left open hold rpc threads, but only up to --max-open-streams: past it they are
    refused at once in the server's words, and a generation and a health check still find a
    thread meanwhile (before the bound, open uploads filled gRPC's cap and shut out health
    checks). The held calls then end on their own and give their places back."""
    wide, other = tenants["wide"], tenants["other"]
    release = threading.Event()

    def held_open():
        yield adapters_pb2.CreateAdapterRequest(header=adapters_pb2.CreateAdapterHeader(
            name="slow"))
        yield adapters_pb2.CreateAdapterRequest(chunk=common_pb2.FileChunk(
            path="adapter_config.json", data=b"{"))
        release.wait(60)

    def open_uploads(count: int) -> list:
        return [wide.adapters.CreateAdapter.future(held_open(), metadata=wide.metadata,
                                                   timeout=90) for _ in range(count)]

    extra = 4  # past the bound: these are refused at once, and one more (the admins' place)
    refused_count = extra + 1
    refusals_before = value(scrape(metrics_port), "cotune_open_stream_refusals_total")
    holders = open_uploads(OPEN_STREAMS + extra)
    health = health_pb2_grpc.HealthStub(other.channel)
    try:
        deadline = time.monotonic() + 20
        while sum(h.done() for h in holders) < refused_count and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = [h for h in holders if h.done()]
        assert len(refused) == refused_count
        for holder in refused:
            assert holder.exception().code() == EXHAUSTED
            assert "uploads, exports and job watches open" in holder.exception().details()
            assert "(--max-open-streams, less the place kept for admins)" \
                in holder.exception().details()
        counted = scrape(metrics_port)  # counted by tenant, for the operator
        assert value(counted, "cotune_open_stream_refusals_total") - refusals_before \
            == refused_count
        assert value(counted, "cotune_open_stream_refusals_total", tenant="wide") \
            == refused_count
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status \
            == health_pb2.HealthCheckResponse.SERVING
        assert_complete(generate(other, max_tokens=4), max_tokens=4)
    finally:
        release.set()
    for holder in holders:  # each ends on its own: an upload without weights
        if holder not in refused:
            assert holder.exception(60).code() == grpc.StatusCode.INVALID_ARGUMENT
    # their places are free again: a new upload gets as far as its own error
    assert open_uploads(1)[0].exception(60).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_bounds_on_calls_held_open_leave_the_admins_a_place_and_each_tenant_one():
    with pytest.raises(ValueError, match=r"--max-open-streams must be at least 2 \(one place "
                                         r"is kept for admins\), got 1"):
        OpenStreams(1)
    for per_tenant in (0, 17):
        with pytest.raises(ValueError, match="--max-open-streams-per-tenant must be from 1 to "
                                             rf"--max-open-streams \(16\), got {per_tenant}"):
            OpenStreams(16, per_tenant)
    assert (OpenStreams(16).per_tenant, OpenStreams(3).per_tenant) == (4, 1)
