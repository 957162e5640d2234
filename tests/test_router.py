"""`cotune route` in front of three real `cotune serve` workers on 127.0.0.1 that share one
data directory: adapter affinity, spill, job placement, cancellation, authentication, and
kill -9 of a worker under load. Where a call landed is read from the workers' own metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from server_helpers import RunningServer, start_server, tiny_adapter_dir, tiny_model_dir
from test_metrics import free_port, scrape, value

from cotune.bench.server_process import LISTENING, OPENAI_API, START_TIMEOUT_S
from cotune.client import Client, Example, Unauthenticated
from cotune.router.hashing import first_unloaded, rendezvous_order
from cotune.router.metrics import RouterMetrics
from cotune.router.pool import Pool
from cotune.server.uploads import Staging
from cotune.v1 import inference_pb2, inference_pb2_grpc

WORKER_IDS = ("w0", "w1", "w2")
TRAINING_DATA = "\n".join(json.dumps({"prompt": f"the cat {i}", "completion": " sat on the mat"})
                          for i in range(4)).encode()


# --- the choice of a worker, without processes ------------------------------------------


def test_removing_a_worker_moves_only_the_adapters_it_was_first_for():
    keys = [f"adapter-{i}" for i in range(600)]
    first = {k: rendezvous_order(k, WORKER_IDS, str)[0] for k in keys}
    shares = [sum(w == worker for w in first.values()) / len(keys) for worker in WORKER_IDS]
    assert all(0.25 < share < 0.42 for share in shares), shares  # spread, not piled up
    for k in keys:
        kept = first[k] if first[k] != "w1" else rendezvous_order(k, WORKER_IDS, str)[1]
        assert rendezvous_order(k, ("w0", "w2"), str)[0] == kept


def test_a_loaded_first_choice_spills_to_the_next_and_all_loaded_to_the_least():
    load = {"a": 3, "b": 1, "c": 2}
    assert first_unloaded(["a", "b", "c"], load.get, threshold=4) == "a"
    assert first_unloaded(["a", "c", "b"], load.get, threshold=3) == "c"
    assert first_unloaded(["a", "c", "b"], load.get, threshold=1) == "b"


class FakeWorker:
    """A real gRPC server with grpc.health.v1 that can turn NOT_SERVING or hang, and one method
    that blocks until released."""

    def __init__(self):
        self.hang, self.release = threading.Event(), threading.Event()
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        outer = self

        class Hanging(health_pb2_grpc.HealthServicer):
            def Check(self, request, context):
                if outer.hang.is_set():
                    outer.release.wait(30)
                return outer.health.Check(request, context)

        self.server = grpc.server(ThreadPoolExecutor(8))
        health_pb2_grpc.add_HealthServicer_to_server(Hanging(), self.server)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Slow", {
            "Wait": grpc.unary_unary_rpc_method_handler(
                lambda request, context: self.release.wait(30) and b"")}),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


def test_the_pool_takes_out_draining_and_hung_workers_and_cancels_only_the_hung_ones_calls():
    a, b = FakeWorker(), FakeWorker()
    pool = Pool(RouterMetrics(), interval=0.1, timeout=1.0, on_health=lambda healthy: None)
    pool.set_workers({"a": a.address, "b": b.address})
    pool.start()
    try:
        healthy = lambda: sorted(w.id for w in pool.healthy())  # noqa: E731
        wait_for(lambda: healthy() == ["a", "b"], what="both workers in rotation")
        calls = {}
        for name in ("a", "b"):
            worker = pool.get(name)
            calls[name] = worker.channel.unary_unary("/t.Slow/Wait").future(b"", timeout=30)
            pool.track(worker, calls[name])
        a.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # draining
        b.hang.set()  # stopped answering
        wait_for(lambda: healthy() == [], what="both workers out of rotation")
        wait_for(calls["b"].done, what="the hung worker's call cancelled")
        assert calls["b"].cancelled() and not calls["a"].done()
        assert "health check failed: DEADLINE_EXCEEDED" in pool.get("b").failure
        a.health.set("", health_pb2.HealthCheckResponse.SERVING)
        wait_for(lambda: healthy() == ["a"], what="the drained worker back")
        pool.set_workers({"a": a.address})  # discovery dropped b
        assert pool.get("b") is None and healthy() == ["a"]
    finally:
        pool.stop()
        for worker in (a, b):
            worker.release.set()
            worker.server.stop(0)


def test_workers_sharing_a_data_dir_sweep_only_their_own_upload_debris(tmp_path):
    root = tmp_path / "uploads"
    with Staging(root, "w0").directory() as staged:
        assert staged.parent == root and staged.name.endswith(".w0")
    mine, theirs = root / "0f.w0", root / "1f.w1"  # what crashes in uploads leave
    mine.mkdir()
    theirs.mkdir()
    Staging(root, "w0")
    assert sorted(root.iterdir()) == [theirs]


def test_the_router_imports_no_torch():
    code = ("import sys, cotune.cli, cotune.router.app; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- three workers and a router ---------------------------------------------------------


@dataclass
class Cluster:
    workers: dict[str, RunningServer]  # by worker id
    metrics_ports: dict[str, int]
    root: object
    token: str

    def static_list(self) -> str:
        return ",".join(f"{i}={w.address}" for i, w in self.workers.items())

    def served(self, adapter: str, status: str = "OK") -> dict[str, float]:
        """Generate calls for `adapter` that each worker counted, by worker id."""
        return {i: value(scrape(port), "cotune_requests_total", adapter=adapter, status=status)
                for i, port in self.metrics_ports.items() if self.workers[i].proc.poll() is None}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("router")
    tiny_model_dir(root)  # made once, before the workers read it
    ports = {i: free_port() for i in WORKER_IDS}
    with ThreadPoolExecutor(3) as pool:
        started = pool.map(lambda i: start_server(
            root, "--worker-id", i, "--metrics-port", str(ports[i]), data_dir=root / "shared"),
            WORKER_IDS)
        workers = dict(zip(WORKER_IDS, started))
    try:
        tokens = {w.admin_token for w in workers.values()}
        assert len(tokens) == 1  # one registry: one admin
        yield Cluster(workers, ports, root, tokens.pop())
    finally:
        for worker in workers.values():
            worker.stop()


@dataclass
class RunningRouter:
    address: str
    metrics_port: int
    proc: subprocess.Popen
    output: list[str]  # every line it printed so far

    def metric(self, name: str, **labels) -> float:
        return value(scrape(self.metrics_port), name, **labels)

    def openai_url(self) -> str:
        """The base URL of the OpenAI-compatible front, for a router started with
        --http-port: the banner's line after the one that says it listens."""
        match = wait_for(lambda: next(filter(None, map(OPENAI_API.match, self.output)), None),
                         what="the router's 'openai api:' line")
        return match[1]


@contextmanager
def router(cluster: Cluster, *extra_args: str):
    with running_router(cluster.static_list(), *extra_args) as r:
        yield r


@contextmanager
def running_router(workers: str, *extra_args: str):
    """`cotune route --workers workers` on a free port, once it listens; terminated after."""
    metrics_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cotune.cli", "route", "--port", "0", "--workers", workers,
         "--metrics-port", str(metrics_port), *extra_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while (line := proc.stdout.readline()) and not LISTENING.search(line):
        output.append(line)
        assert time.monotonic() < deadline, "".join(output)
    match = LISTENING.search(line)
    assert match, "cotune route did not start:\n" + "".join(output)
    output.append(line)

    def keep_reading() -> None:  # the pipe drained; the banner's later lines for openai_url
        for line in proc.stdout:
            output.append(line)

    threading.Thread(target=keep_reading, daemon=True).start()
    try:
        yield RunningRouter(f"{match[1]}:{match[2]}", metrics_port, proc, output)
    finally:
        proc.terminate()
        proc.wait(30)


def wait_for(condition, timeout: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.1)
    return result


def order_of(adapter: str, among=WORKER_IDS) -> list[str]:
    return rendezvous_order(adapter, among, str)


def upload(client: Client, cluster: Cluster, name: str, seed: int) -> None:
    client.adapters.create(name, tiny_adapter_dir(cluster.root / name, seed=seed))


def test_requests_for_one_adapter_land_on_its_worker_while_it_is_healthy(cluster):
    with router(cluster) as r, Client(r.address, cluster.token) as client:
        for seed, name in enumerate(("sticky-a", "sticky-b")):
            upload(client, cluster, name, seed)
            for _ in range(4):
                assert len(client.complete("the cat", adapter=name, max_tokens=4).token_ids) == 4
            expected = {i: 4.0 if i == order_of(name)[0] else 0.0 for i in WORKER_IDS}
            assert cluster.served(name) == expected
        assert r.metric("cotune_router_healthy_workers") == 3


def test_a_worker_past_the_spill_threshold_spills_to_the_next_in_rendezvous_order(cluster):
    first, second = order_of("spilled")[:2]
    with router(cluster, "--spill-threshold", "1") as r, \
            Client(r.address, cluster.token) as client:
        upload(client, cluster, "spilled", seed=7)
        long = client.generate("the cat", adapter="spilled", max_tokens=200, ignore_eos=True)
        deltas = [next(long)]  # in flight on the first worker now
        short = client.complete("the cat", adapter="spilled", max_tokens=4)
        deltas += list(long)
        assert len(short.token_ids) == 4 and sum(len(d.token_ids) for d in deltas) == 200
        served = cluster.served("spilled")
        assert (served[first], served[second]) == (1.0, 1.0)
        assert r.metric("cotune_router_spills_total") == 1


def test_a_job_is_placed_on_a_worker_and_watched_through_the_router(cluster):
    with router(cluster) as r, Client(r.address, cluster.token) as client:
        job = client.jobs.create("routed-job", TRAINING_DATA, max_steps=2, batch_size=2)
        assert job.owner in WORKER_IDS
        done = client.jobs.wait(job.id, timeout=120)  # WatchJob, sent to the owner
        assert (done.state, done.owner, done.versions) == ("succeeded", job.owner,
                                                           ("routed-job@v1",))
        steps = {i: value(scrape(port), "cotune_job_steps_total", adapter="routed-job")
                 for i, port in cluster.metrics_ports.items()}
        assert steps == {i: 2.0 if i == job.owner else 0.0 for i in WORKER_IDS}
        watches = {i: r.metric("cotune_router_calls_total", worker=i, method="WatchJob")
                   for i in WORKER_IDS}  # OK, or CANCELLED: wait closes it at the last state
        assert watches == {i: 1.0 if i == job.owner else 0.0 for i in WORKER_IDS}
        assert client.complete("the cat", adapter="routed-job", max_tokens=2).token_ids


def test_a_job_cancelled_through_another_router_is_cancelled_by_its_owner(cluster):
    """A router that did not place the job finds its owner from Job.owner."""
    with router(cluster) as placing, Client(placing.address, cluster.token) as client:
        job = client.jobs.create("long-job", TRAINING_DATA, max_steps=100_000, batch_size=2)
    with router(cluster) as other, Client(other.address, cluster.token) as client:
        assert client.jobs.cancel(job.id).state == "cancelled"

        def cancelled() -> dict:
            return {i: value(scrape(port), "cotune_jobs_finished_total", state="cancelled")
                    for i, port in cluster.metrics_ports.items()}

        # the owner stops the job at its next step boundary, after the call has returned
        wait_for(lambda: cancelled() == {i: 1.0 if i == job.owner else 0.0 for i in WORKER_IDS},
                 what="the owner stopping the job")
        assert other.metric("cotune_router_calls_total", worker=job.owner, method="CancelJob",
                            code="OK") == 1


def test_a_job_cancelled_at_a_worker_that_does_not_run_it_is_stopped_by_its_owner(cluster):
    """Without the router (or with the owner out of its rotation) the cancel lands elsewhere:
    the shared registry says cancelled, and the owner stops the job at its next step."""
    with router(cluster) as r, Client(r.address, cluster.token) as client:
        job = client.jobs.create("stray-cancel", TRAINING_DATA, max_steps=100_000, batch_size=2)
    stranger = next(i for i in WORKER_IDS if i != job.owner)

    def cancelled_by_owner() -> float:
        return value(scrape(cluster.metrics_ports[job.owner]), "cotune_jobs_finished_total",
                     state="cancelled")

    before = cancelled_by_owner()
    with Client(cluster.workers[stranger].address, cluster.token) as client:
        assert client.jobs.cancel(job.id).state == "cancelled"
        wait_for(lambda: cancelled_by_owner() == before + 1, what="the owner stopping the job")
        assert client.jobs.get(job.id).state == "cancelled"


def test_every_call_on_a_session_reaches_the_worker_that_holds_it(cluster):
    """A session lives in one worker's memory: the router that placed it sends its calls
    there, and another router finds that worker by asking."""
    example = Example([5, 9, 14, 3, 27], [0.0, 0.0, 0.0, 1.0, 1.0])
    with router(cluster) as r, Client(r.address, cluster.token) as client:
        session = client.sessions.create("routed-session", rank=4, lr=0.05)
        for _ in range(3):  # three workers: a call sent anywhere would miss it
            session.forward_backward([example])
            session.optim_step()
        assert session.sample(prompt_token_ids=[5, 9], max_tokens=2).weights_version == 3
        held = {i for i in WORKER_IDS
                if r.metric("cotune_router_calls_total", worker=i, method="OptimStep")}
        assert len(held) == 1
    with router(cluster) as other, Client(other.address, cluster.token) as client:
        found = client.sessions.get(session.id)
        assert found.info.steps == 3
        assert found.save().ref == "routed-session@v1"
        assert found.close().state == "closed"
        assert other.metric("cotune_router_calls_total", worker=held.pop(), method="SaveVersion",
                            code="OK") == 1


def test_abort_reaches_the_worker_that_runs_the_request(cluster):
    with router(cluster) as r, Client(r.address, cluster.token) as client:
        upload(client, cluster, "aborted", seed=5)
        named = client.generate("the cat", adapter="aborted", max_tokens=240, ignore_eos=True,
                                request_id="mine")
        unnamed = client.generate("the cat", max_tokens=240, ignore_eos=True)
        next(named)
        first = next(unnamed)  # the worker names it in its first message
        assert client.abort("mine") and client.abort(first.request_id)
        assert [d.finish_reason for d in named][-1] == "abort"
        assert [d.finish_reason for d in unnamed][-1] == "abort"
        assert not client.abort("mine")  # over


def test_a_cancelled_stream_cancels_the_workers_call(cluster):
    with router(cluster) as r, Client(r.address, cluster.token) as client:
        upload(client, cluster, "cancelled", seed=3)
        stream = client.generate("the cat", adapter="cancelled", max_tokens=240,
                                 ignore_eos=True)
        next(stream)
        stream.close()
        worker = order_of("cancelled")[0]
        wait_for(lambda: cluster.served("cancelled", "CANCELLED")[worker] == 1.0,
                 what="the worker's call ending CANCELLED")
        assert cluster.served("cancelled", "OK")[worker] == 0.0
        wait_for(lambda: r.metric("cotune_router_calls_in_flight") == 0,
                 what="the router's call ending")
        assert r.metric("cotune_router_calls_total", worker=worker, method="Generate",
                        code="CANCELLED") == 1


def test_calls_without_a_valid_token_are_refused_through_the_router(cluster):
    with router(cluster) as r:
        for token in ("", "ct_0123456789ab_" + "A" * 43):
            with Client(r.address, token) as client, pytest.raises(Unauthenticated):
                list(client.adapters.list())
            with Client(r.address, token) as client, pytest.raises(Unauthenticated):
                client.complete("the cat", max_tokens=2)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10).status


def test_kill_9_of_an_adapters_worker_loses_no_request_the_sdk_can_retry(cluster):
    """Runs last: it kills a worker of the module's cluster."""
    victim, heir = order_of("victim")[:2]
    with router(cluster, "--health-timeout", "10") as r, \
            Client(r.address, cluster.token, retries=5) as client:
        upload(client, cluster, "victim", seed=11)
        client.complete("the cat", adapter="victim", max_tokens=2)  # resident on the victim
        worker = cluster.workers[victim]
        os.kill(worker.proc.pid, signal.SIGSTOP)  # calls now wait on it, accepted, unanswered
        raw_error = []

        def raw_call():  # no SDK: what the router answers
            with grpc.insecure_channel(r.address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                try:
                    list(stub.Generate(inference_pb2.GenerateRequest(
                        prompt="the cat", adapter="victim"), timeout=60,
                        metadata=[("authorization", f"Bearer {cluster.token}")]))
                except grpc.RpcError as e:
                    raw_error.append(e)

        with ThreadPoolExecutor(5) as pool:
            raw = pool.submit(raw_call)
            completions = [pool.submit(client.complete, "the cat", adapter="victim",
                                       max_tokens=8, ignore_eos=True) for _ in range(4)]
            wait_for(lambda: r.metric("cotune_router_calls_in_flight", worker=victim) == 5,
                     what="five calls in flight on the stopped worker")
            worker.proc.kill()  # kill -9
            worker.proc.wait(30)
            results = [c.result(timeout=120) for c in completions]
            raw.result(timeout=120)
        assert [len(c.token_ids) for c in results] == [8] * 4  # retried on another worker
        assert raw_error[0].code() == grpc.StatusCode.UNAVAILABLE
        assert f"worker {victim} ({worker.address}) failed" in raw_error[0].details()
        assert r.metric("cotune_router_calls_total", worker=victim, method="Generate",
                        code="UNAVAILABLE") == 5
        assert r.metric("cotune_router_worker_healthy", worker=victim) == 0
        assert r.metric("cotune_router_healthy_workers") == 2
        assert _health(r.address) == health_pb2.HealthCheckResponse.SERVING
        assert cluster.served("victim")[heir] == 4.0
        client.complete("the cat", adapter="victim", max_tokens=2)
        assert cluster.served("victim")[heir] == 5.0
        time.sleep(2.5)  # health rounds pass: the dead worker stays out
        assert r.metric("cotune_router_worker_healthy", worker=victim) == 0
