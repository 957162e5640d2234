"""The OpenAI-compatible HTTP front of a real `cotune serve --http-port` on 127.0.0.1, called
with the real `openai` client: health, authentication, the models a tenant sees, and the
stop (the front answers while the gRPC calls drain)."""

from __future__ import annotations

import signal
import threading
import time

import httpx2 as httpx
import openai
import pytest
from server_helpers import running_server, tiny_adapter_dir
from wire import Caller

from cotune.v1 import inference_pb2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("http-front")
    with running_server(root, "--http-port", "0") as server:
        yield server


@pytest.fixture(scope="module")
def tenants(server, admin, tmp_path_factory):
    """Two tenants, each with a token and one adapter of its own."""
    adapters = tmp_path_factory.mktemp("adapters")
    tokens = {}
    for i, name in enumerate(("acme", "globex")):
        tokens[name] = admin.new_tenant(name)
        caller = Caller(server.address, tokens[name])
        caller.upload(f"{name}-helper", tiny_adapter_dir(adapters / name, seed=i))
        caller.close()
    return tokens


def client(server, token: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url(), api_key=token or "", max_retries=0)


def test_health_is_open_and_says_serving(server):
    reply = httpx.get(server.openai_url().removesuffix("/v1") + "/health", timeout=10)
    assert reply.status_code == 200 and reply.json() == {"status": "SERVING"}


def test_models_lists_the_base_and_only_the_callers_adapters(server, tenants):
    models = client(server, tenants["acme"]).models.list().data
    ids = [m.id for m in models]
    assert ids == [models[0].id, "acme-helper"]
    base = models[0]
    assert base.root == base.id and getattr(base, "parent", None) is None
    assert models[1].root == base.id and models[1].parent == base.id


def test_a_model_of_another_tenant_is_not_found(server, tenants):
    with pytest.raises(openai.NotFoundError) as caught:
        client(server, tenants["acme"]).models.retrieve("globex-helper")
    assert caught.value.body["param"] == "model"
    assert client(server, tenants["globex"]).models.retrieve("globex-helper").id == \
        "globex-helper"


def test_an_unknown_token_is_401_with_openais_error(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, "not-a-token").models.list()
    error = caught.value.body
    assert caught.value.status_code == 401 and "Bearer" in error["message"]
    assert error["type"] == "authentication_error"


def test_a_call_without_a_token_is_401_naming_the_header(server):
    reply = httpx.get(server.openai_url() + "/models", timeout=10)
    assert reply.status_code == 401
    assert "no Authorization header" in reply.json()["error"]["message"]


def test_an_unknown_route_is_404_in_openais_format(server, tenants):
    reply = httpx.get(server.openai_url() + "/nothing-here",
                      headers={"Authorization": f"Bearer {tenants['acme']}"}, timeout=10)
    assert reply.status_code == 404
    assert "no route GET /v1/nothing-here" in reply.json()["error"]["message"]



def test_a_stopping_server_answers_http_503_saying_why_until_its_calls_have_drained(tmp_path):
    """A server of its own, SIGTERM with an upload in flight: new HTTP calls get a 503 that
    says the server is shutting down (not the error of the private socket it closed), the
    upload completes, and only then does the front stop."""
    release = threading.Event()
    with running_server(tmp_path, "--http-port", "0", "--grace-period", "60") as server:
        base_url = server.openai_url()
        caller = Caller(server.address, server.admin_token)
        upload = caller.held_upload("drained", tiny_adapter_dir(tmp_path / "a"), release)
        # answered after the upload started on the same connection: the upload is in flight
        caller.inference.GetModelInfo(inference_pb2.GetModelInfoRequest(),
                                      metadata=caller.metadata, timeout=10)
        server.proc.send_signal(signal.SIGTERM)

        def models() -> httpx.Response:
            return httpx.get(base_url + "/models", timeout=10,
                             headers={"Authorization": f"Bearer {server.admin_token}"})

        deadline = time.monotonic() + 30
        while (reply := models()).status_code != 503:
            assert time.monotonic() < deadline, reply.text
            time.sleep(0.05)
        assert "shutting down" in reply.json()["error"]["message"]
        assert httpx.get(base_url.removesuffix("/v1") + "/health", timeout=10).status_code == 503
        assert server.proc.poll() is None  # still draining: the upload holds it
        release.set()
        assert upload.result(timeout=60).name == "drained"
        caller.close()
        assert server.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            models()
