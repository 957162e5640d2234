"""grpc.health.v1 of `cotune serve` tells the truth: NOT_SERVING until the jobs have resumed,
once the engine stopped on an error (its traceback logged), and while the engine is wedged,
SERVING again once it steps; a health check answers at once throughout.

The server is the real `CotuneServer` in this process, on a tiny model, listening on
loopback: its engine's model is made to fail or to wait, which a subprocess cannot be made
to do."""

from __future__ import annotations

import argparse
import logging
import threading
import time
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import tiny_model_dir
from wire import Caller

from cotune.server.app import SERVICES, CotuneServer
from cotune.server.options import add_serve_arguments

pytestmark = pytest.mark.slow

SERVING, NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING)
STALL_S = 1.0


def server_of(root) -> CotuneServer:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return CotuneServer(parser.parse_args([
        "--model", str(tiny_model_dir(root)), "--data-dir", str(root / "data"), "--port", "0",
        "--max-rank", "16", "--num-slots", "8", "--kv-cache-tokens", "4096",
        "--grace-period", "5", "--training-threads", "0",
        "--health-stall-seconds", str(STALL_S)]))


@contextmanager
def started(server: CotuneServer):
    server.start()
    caller = Caller(f"127.0.0.1:{server.port}", server.admin_token_file.read_text().strip())
    try:
        yield caller
    finally:
        caller.close()
        server.stop()


def statuses(caller: Caller) -> set[int]:
    """The status of the server and of each of its services; each check must answer at once."""
    health = health_pb2_grpc.HealthStub(caller.channel)
    return {health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            for service in ("", *SERVICES)}


def wait_for(caller: Caller, status: int, timeout: float = 20) -> float:
    """Polls health until every service says `status`; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if statuses(caller) == {status}:
            return time.monotonic()
        time.sleep(0.05)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    raise AssertionError(f"health did not turn {name} within {timeout} s")


def test_health_is_not_serving_until_the_jobs_have_resumed(tmp_path):
    server = server_of(tmp_path)
    seen = []
    resume = server.jobs.resume_unfinished

    def resume_observed() -> None:  # the server listens by now
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            seen.extend(health.Check(health_pb2.HealthCheckRequest(service=service),
                                     timeout=5).status for service in ("", *SERVICES))
        resume()

    server.jobs.resume_unfinished = resume_observed
    with started(server) as caller:
        assert seen == [NOT_SERVING] * (1 + len(SERVICES))
        assert statuses(caller) == {SERVING}


def test_an_engine_stopped_on_an_error_is_not_serving_and_its_traceback_is_logged(
        tmp_path, caplog):
    server = server_of(tmp_path)
    model = server.runtime.engine.model

    def broken_kernel(batch):
        raise RuntimeError("a kernel failed")

    with caplog.at_level(logging.ERROR, logger="cotune.server"), started(server) as caller:
        assert statuses(caller) == {SERVING}
        model.forward = broken_kernel  # every pass fails: the base's fault stops the engine
        with pytest.raises(grpc.RpcError):
            caller.generate(max_tokens=4)
        wait_for(caller, NOT_SERVING)
        assert not server.runtime.running
        time.sleep(3 * server.health.poll_s)
        assert statuses(caller) == {NOT_SERVING}  # for good
    logged = [r for r in caplog.records if "the engine stopped on an error" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert logged[0].exc_info[1] is server.runtime.error
    text = logging.Formatter().format(logged[0])
    assert "Traceback (most recent call last)" in text and "in broken_kernel" in text


def test_a_wedged_engine_is_not_serving_after_the_stall_time_and_serving_once_it_steps(
        tmp_path, caplog):
    server = server_of(tmp_path)
    model = server.runtime.engine.model
    forward, release = model.forward, threading.Event()

    def wedged(batch):
        release.wait()
        return forward(batch)

    with caplog.at_level(logging.INFO, logger="cotune.server"), started(server) as caller:
        assert statuses(caller) == {SERVING}
        model.forward = wedged
        outcome = {}
        generating = threading.Thread(
            target=lambda: outcome.setdefault("tokens", caller.tokens_of(
                caller.generate(max_tokens=4))))
        sent = time.monotonic()
        generating.start()
        try:
            stalled = wait_for(caller, NOT_SERVING)
            assert stalled - sent >= STALL_S  # not before the stall time
            assert server.runtime.running
        finally:
            release.set()
        wait_for(caller, SERVING)
        generating.join(60)
        assert len(outcome["tokens"]) == 4
        assert caller.tokens_of(caller.generate(max_tokens=2))  # and it goes on serving
    messages = [r.getMessage() for r in caplog.records]
    assert any("health is NOT_SERVING: no engine step has completed" in m and "wedged" in m
               for m in messages), messages
    assert "health is SERVING again: the engine steps" in messages
