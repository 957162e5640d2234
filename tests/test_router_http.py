"""The OpenAI-compatible HTTP front of a real `cotune route --http-port` in front of a real
`cotune serve` worker on 127.0.0.1, called with the real `openai` client. The router's front
translates to the router's own gRPC services, so every call below is forwarded to the worker
like a gRPC call: the router's metrics count it."""

from __future__ import annotations

import signal
import threading

import httpx2 as httpx
import openai
import pytest
from server_helpers import running_server, tiny_adapter_dir
from test_metrics import free_port
from test_router import running_router, wait_for
from wire import Caller

from cotune.v1 import inference_pb2


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("router-http")
    with running_server(root, "--worker-id", "w0") as worker:
        yield worker


@pytest.fixture(scope="module")
def tokens(worker, tmp_path_factory):
    """Two tenants of the worker's registry, each with a token and one adapter of its own."""
    adapters = tmp_path_factory.mktemp("adapters")
    admin = Caller(worker.address, worker.admin_token)
    tokens = {}
    for i, name in enumerate(("acme", "globex")):
        tokens[name] = admin.new_tenant(name)
        caller = Caller(worker.address, tokens[name])
        caller.upload(f"{name}-helper", tiny_adapter_dir(adapters / name, seed=i))
        caller.close()
    admin.close()
    return tokens


@pytest.fixture(scope="module")
def routed(worker):
    with running_router(f"w0={worker.address}", "--http-port", "0") as r:
        yield r


def client(router, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.openai_url(), api_key=token, max_retries=0)


def health(router) -> httpx.Response:
    return httpx.get(router.openai_url().removesuffix("/v1") + "/health", timeout=10)


def test_health_through_the_router_says_serving(routed):
    reply = health(routed)
    assert reply.status_code == 200 and reply.json() == {"status": "SERVING"}


def test_models_through_the_router_are_the_base_and_the_callers_adapters(worker, tokens,
                                                                           routed):
    before = routed.metric("cotune_router_calls_total", worker="w0", method="ListAdapters",
                           code="OK")
    models = client(routed, tokens["acme"]).models.list().data
    base = Caller(worker.address, tokens["acme"])
    info = base.inference.GetModelInfo(inference_pb2.GetModelInfoRequest(),
                                       metadata=base.metadata, timeout=10)
    base.close()
    assert [m.id for m in models] == [info.name, "acme-helper"]
    assert models[1].parent == info.name
    # forwarded to the worker by the router, as a gRPC call would be
    assert routed.metric("cotune_router_calls_total", worker="w0", method="ListAdapters",
                         code="OK") == before + 1
    with pytest.raises(openai.NotFoundError):
        client(routed, tokens["acme"]).models.retrieve("globex-helper")
    assert client(routed, tokens["globex"]).models.retrieve("globex-helper").parent == info.name


def test_an_unknown_token_through_the_router_is_401_from_the_worker(routed):
    before = routed.metric("cotune_router_calls_total", worker="w0", code="UNAUTHENTICATED")
    with pytest.raises(openai.AuthenticationError) as caught:
        client(routed, "not-a-token").models.list()
    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "authentication_error"
    # the router reads no token: the worker refused it
    assert routed.metric("cotune_router_calls_total", worker="w0",
                         code="UNAUTHENTICATED") == before + 1


def test_with_no_healthy_worker_health_and_calls_are_503(tokens):
    nobody = f"w9=127.0.0.1:{free_port()}"  # nothing listens there
    with running_router(nobody, "--http-port", "0", "--health-timeout", "0.5") as r:
        reply = health(r)
        assert reply.status_code == 503 and reply.json() == {"status": "NOT_SERVING"}
        with pytest.raises(openai.InternalServerError) as caught:
            client(r, tokens["acme"]).models.list()
        assert caught.value.status_code == 503
        assert caught.value.body["type"] == "service_unavailable_error"
        assert "no worker is healthy" in caught.value.body["message"]


def test_a_stopping_router_answers_http_503_while_it_drains_then_stops_the_front(worker,
                                                                                 tokens,
                                                                                 tmp_path):
    """SIGTERM with an upload in flight: the gRPC drain waits for the upload, and meanwhile the
    HTTP front still answers, 503 (a load balancer takes the router out instead of seeing
    refused connections); the front stops once the drain has ended, and the router exits 0."""
    release = threading.Event()
    with running_router(f"w0={worker.address}", "--http-port", "0",
                        "--grace-period", "60") as r:
        base_url = r.openai_url()
        caller = Caller(r.address, tokens["acme"])
        upload = caller.held_upload("drained", tiny_adapter_dir(tmp_path / "a", seed=9), release)
        wait_for(lambda: r.metric("cotune_router_calls_in_flight", worker="w0") == 1,
                 what="the upload in flight on the router")
        r.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: health(r).status_code == 503, what="/health turning 503")
        with pytest.raises(openai.InternalServerError) as caught:
            client(r, tokens["acme"]).models.list()
        assert caught.value.status_code == 503
        assert "shutting down" in caught.value.body["message"]
        assert r.proc.poll() is None  # still draining: the upload holds it
        release.set()
        assert upload.result(timeout=60).name == "drained"  # the call in flight completed
        caller.close()
        assert r.proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(base_url.removesuffix("/v1") + "/health", timeout=10)


def test_generation_through_the_router_equals_the_workers_and_is_routed(worker, tokens, routed):
    """A completion, a streamed chat and the worker's own gRPC Generate give the same greedy
    tokens; the router forwards the Generate calls to the worker, as gRPC ones."""
    acme = client(routed, tokens["acme"])
    direct = Caller(worker.address, tokens["acme"])
    expected = "".join(r.text for r in direct.generate("the cat", "acme-helper", max_tokens=6))
    direct.close()
    before = routed.metric("cotune_router_calls_total", worker="w0", method="Generate",
                           code="OK")
    cancelled = routed.metric("cotune_router_calls_total", worker="w0", method="Generate",
                              code="CANCELLED")
    reply = acme.completions.create(model="acme-helper", prompt="the cat", max_tokens=6)
    assert reply.choices[0].text == expected and reply.model == "acme-helper@v1"
    chunks = list(acme.chat.completions.create(
        model="acme-helper", messages=[{"role": "user", "content": "the cat"}], max_tokens=4,
        stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # the router counts a call once its stream has ended on its side, after the client's
    wait_for(lambda: routed.metric("cotune_router_calls_total", worker="w0",
                                   method="Generate", code="OK") == before + 2,
             what="the router counting both Generate calls")
    # read to their ends, never cancelled after their last token
    assert routed.metric("cotune_router_calls_total", worker="w0", method="Generate",
                         code="CANCELLED") == cancelled
