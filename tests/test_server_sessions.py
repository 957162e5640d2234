"""RL sessions of a real `cotune serve` on 127.0.0.1 (a tiny model), driven by the SDK: a
session trains, samples from its live weights and saves a version that serves the same tokens;
it is its tenant's alone; bad input changes nothing; max_sessions and the idle timeout hold
its places; the async client does the same."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time

import grpc
import pytest
from server_helpers import TRAINING_DATA, running_server

from cotune.client import (
    AsyncClient,
    Client,
    Example,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Session,
)
from cotune.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.slow

PROMPT = [5, 9, 14, 3, 27]
LORA = dict(rank=4, alpha=8, targets=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("sessions")) as server:
        yield server


@pytest.fixture(scope="module")
def admin(server):
    with Client(server.address, server.admin_token) as client:
        yield client


def tenant_client(server, admin, name: str, **quotas) -> Client:
    """A client of a new tenant `name` of `server`, with `quotas` (the others the defaults)."""
    admin.tenants.create(name, **quotas)
    return Client(server.address, admin.tenants.issue_token(name).token)


def example_of(completion_ids, **fields) -> Example:
    """PROMPT and a completion as one example, the completion's tokens weighted 1."""
    tokens = PROMPT + list(completion_ids)
    return Example(tokens, [0.0] * len(PROMPT) + [1.0] * len(completion_ids), **fields)


def assert_close(result, expected) -> None:
    """Two ForwardResults' logprobs, equal up to float32 noise."""
    assert len(result.logprobs) == len(expected.logprobs)
    for got, want in zip(result.logprobs, expected.logprobs, strict=True):
        assert list(got) == pytest.approx(list(want), abs=1e-5)


def greedy(session_or_client, **where):
    options = dict(max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    if isinstance(session_or_client, Session):
        return session_or_client.sample(prompt_token_ids=PROMPT, **options)
    return session_or_client.complete(PROMPT, **options, **where)


def test_a_session_trains_samples_its_live_weights_and_saves_a_version_that_serves_the_same(
        server, admin, tmp_path):
    with tenant_client(server, admin, "rl") as client:
        session = client.sessions.create("policy", **LORA, lr=0.05, seed=1)
        assert session.id.startswith("sess-") and len(session.id) == 5 + 32
        info = session.info
        assert (info.state, info.steps, info.weights_version, info.parent) == ("open", 0, 0, "")
        assert info.lora["rank"] == 4 and info.optimizer["lr"] == 0.05
        assert [s.id for s in client.sessions.list()] == [session.id]

        before = greedy(session)
        assert before.weights_version == 0 and len(before.token_ids) == 6
        example = example_of(before.token_ids)
        trained = session.forward_backward([example])
        assert trained.weights_version == 0 and trained.loss is not None
        (logprobs,) = trained.logprobs
        assert len(logprobs) == len(example.token_ids) and logprobs[0] == 0.0
        # the sampler's logprobs are those a Forward computes under the same weights
        sampled = [lp.logprob for lp in before.logprobs]
        assert sampled == pytest.approx(list(logprobs[len(PROMPT):]), abs=1e-3)
        assert trained.loss == pytest.approx(-sum(sampled), abs=1e-3)
        assert_close(session.forward([example.token_ids]), trained)  # and no gradients

        step = session.optim_step(lr=0.05)
        assert (step.steps, step.weights_version) == (1, 1) and step.grad_norm > 0
        moved = session.forward([example.token_ids])
        assert moved.weights_version == 1 and moved.logprobs != trained.logprobs
        after = greedy(session)
        assert after.weights_version == 1

        # ppo on what was sampled: the sampler's logprobs, an advantage per token
        completion = len(before.token_ids)
        ppo = example_of(before.token_ids, logprobs=[0.0] * len(PROMPT) + sampled,
                         advantages=[0.0] * len(PROMPT) + [1.0] * completion)
        assert session.forward_backward([ppo], loss="ppo", clip_low=0.2,
                                        clip_high=0.3).loss is not None
        session.optim_step()  # the settings given at create

        version = session.save()
        assert version.ref == "policy@v1"
        assert version.provenance["source"] == "session"
        assert version.provenance["session_id"] == session.id
        assert (version.provenance["steps"], version.provenance["parent_version"]) == (2, None)
        assert session.save() == version  # the same weights: the same version
        live = greedy(session)
        assert live.weights_version == 2
        served = greedy(client, adapter=version.ref)
        assert served.token_ids == live.token_ids
        assert served.adapter == version.ref and served.weights_version == 0
        exported = client.adapters.export(version.ref, tmp_path / "exported")
        config = json.loads((exported / "adapter_config.json").read_text())
        assert (config["r"], sorted(config["target_modules"])) == (4, ["q_proj", "v_proj"])

        # a session that continues the version starts from its weights
        continued = client.sessions.create(version.ref, seed=7)
        assert continued.info.parent == version.ref and continued.info.lora["rank"] == 4
        assert greedy(continued).token_ids == live.token_ids
        assert_close(continued.forward([example.token_ids]), session.forward([example.token_ids]))
        continued.forward_backward([example])
        continued.optim_step()
        continued_version = continued.save()
        assert continued_version.ref == "policy@v2"
        assert continued_version.provenance["parent_version"] == 1

        closed = session.close()
        assert (closed.state, closed.close_reason) == ("closed", "closed by CloseSession")
        assert session.close().state == "closed"  # closing again: as it is
        with pytest.raises(FailedPrecondition, match=f"session {session.id} is closed"):
            session.forward([example.token_ids])
        with pytest.raises(FailedPrecondition, match="closed by CloseSession"):
            session.sample(prompt_token_ids=PROMPT, max_tokens=2)
        assert client.sessions.get(session.id).info.state == "closed"
        assert [s.id for s in client.sessions.list()] == [continued.id]
        continued.close()


def test_dora_trains_in_a_session_and_in_a_job_and_serves_what_it_saved(server, admin,
                                                                        tmp_path):
    with tenant_client(server, admin, "dora") as client:
        session = client.sessions.create("dora-policy", **LORA, dora=True, lr=0.05, seed=1)
        before = greedy(session)
        session.forward_backward([example_of(before.token_ids)])
        assert session.optim_step().grad_norm > 0
        live = greedy(session)
        version = session.save()
        exported = client.adapters.export(version.ref, tmp_path / "session")
        assert json.loads((exported / "adapter_config.json").read_text())["use_dora"] is True
        assert greedy(client, adapter=version.ref).token_ids == live.token_ids
        job = client.jobs.create("dora-job", TRAINING_DATA, dora=True, rank=4, max_steps=2,
                                 batch_size=2)
        assert client.jobs.wait(job.id, timeout=300).state == "succeeded"
        client.adapters.export("dora-job", tmp_path / "job")
        assert json.loads((tmp_path / "job" / "adapter_config.json").read_text())["use_dora"]
        with pytest.raises(InvalidArgument, match="DoRA adapter, and this training is plain"):
            client.sessions.create(f"{version.ref}")  # continued without dora


def test_a_generation_keeps_the_weights_it_started_with_through_an_optim_step(server, admin):
    with tenant_client(server, admin, "steady") as client:
        session = client.sessions.create("steady", **LORA, lr=0.05)
        stream = session.stream(prompt_token_ids=PROMPT, max_tokens=200, ignore_eos=True)
        deltas = [next(stream)]  # in flight now
        session.forward_backward([example_of([7, 8, 9])])
        assert session.optim_step().weights_version == 1
        deltas += list(stream)
        assert sum(len(d.token_ids) for d in deltas) == 200
        assert {d.weights_version for d in deltas} == {0}
        assert greedy(session).weights_version == 1  # issued after the step: the new weights
        session.close()


def test_another_tenant_gets_not_found_for_a_session_it_does_not_own(server, admin):
    with tenant_client(server, admin, "owner") as owner, \
            tenant_client(server, admin, "intruder") as intruder:
        session = owner.sessions.create("mine", **LORA)
        theirs = Session(intruder.sessions, session.info)  # the id, known to the intruder
        never = Session(intruder.sessions, dataclasses.replace(session.info,
                                                               id="sess-" + "0" * 32))
        example = example_of([7, 8])
        calls = {
            "get": lambda s: intruder.sessions.get(s.id),
            "forward_backward": lambda s: s.forward_backward([example]),
            "forward": lambda s: s.forward([example.token_ids]),
            "optim_step": lambda s: s.optim_step(),
            "sample": lambda s: s.sample(prompt_token_ids=PROMPT, max_tokens=2),
            "save": lambda s: s.save(),
            "close": lambda s: s.close(),
        }
        for name, call in calls.items():
            with pytest.raises(NotFound) as real:
                call(theirs)
            with pytest.raises(NotFound) as unknown:
                call(never)
            # nothing tells the intruder that the id exists
            assert real.value.message.replace(session.id, "?") == \
                unknown.value.message.replace(never.id, "?"), name
        assert intruder.sessions.list() == []
        assert session.refresh().state == "open"  # the intruder's close did nothing
        session.close()


def test_bad_input_is_refused_and_leaves_the_session_unchanged(server, admin):
    with tenant_client(server, admin, "careless") as client:
        session = client.sessions.create("checked", **LORA, seed=3)
        good = example_of([7, 8, 9])
        before = session.forward([good.token_ids])
        sampled = {"logprobs": [0.0] * 5 + [-1.0] * 3, "advantages": [0.0] * 5 + [1.0] * 3}
        bad = {
            "weights of another length": ([Example(good.token_ids, [0.0, 1.0])], {},
                                          "2 weights for 8 tokens"),
            "NaN advantages": ([example_of([7, 8, 9], logprobs=sampled["logprobs"],
                                           advantages=[0.0] * 7 + [math.nan])],
                               {"loss": "importance_sampling"}, "finite"),
            "an unknown loss": ([good], {"loss": "reinforce"}, "loss 'reinforce'"),
            "ppo weights not 0 or 1": ([Example(good.token_ids, [0.0] * 5 + [0.5] * 3,
                                                **sampled)], {"loss": "ppo"}, "0 or 1"),
            "no examples": ([], {}, "at least one example"),
            "a token outside the vocabulary": ([Example([1, 10**6], [0.0, 1.0])], {},
                                               "outside the vocabulary"),
        }
        for name, (examples, options, message) in bad.items():
            with pytest.raises(InvalidArgument) as refused:
                session.forward_backward(examples, **options)
            assert message in refused.value.message, name
        with pytest.raises(InvalidArgument, match="lr"):
            session.optim_step(lr=5.0)
        info = session.refresh()
        assert (info.steps, info.weights_version) == (0, 0)
        assert_close(session.forward([good.token_ids]), before)
        # nothing of the refused calls was accumulated: a step after one good example moves
        # the weights exactly as in a session that saw only that example
        twin = client.sessions.create("checked", **LORA, seed=3)
        for s in (session, twin):
            s.forward_backward([good])
        assert session.optim_step().grad_norm == pytest.approx(twin.optim_step().grad_norm,
                                                                rel=1e-5)
        assert_close(session.forward([good.token_ids]), twin.forward([good.token_ids]))
        both = inference_pb2.GenerateRequest(prompt_token_ids=inference_pb2.TokenIds(ids=PROMPT),
                                             adapter="checked", session=session.id)
        stub = inference_pb2_grpc.InferenceServiceStub(client._t.channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(both, metadata=client._t.metadata))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "adapter and session are both set" in refused.value.details()
        session.close()
        twin.close()


def test_max_sessions_refuses_one_more_session_until_one_closes(server, admin):
    with tenant_client(server, admin, "capped", max_sessions=1,
                       max_versions_per_adapter=1) as client:
        first = client.sessions.create("one", **LORA)
        with pytest.raises(ResourceExhausted, match="max_sessions quota is 1"):
            client.sessions.create("two", **LORA)
        first.save()
        first.forward_backward([example_of([7, 8])])
        first.optim_step()
        with pytest.raises(ResourceExhausted, match="max_versions_per_adapter"):
            first.save()  # a session's versions count like any other
        first.close()
        client.sessions.create("two", **LORA).close()


def test_deleting_a_tenant_closes_its_sessions(server, admin):
    with tenant_client(server, admin, "leaving") as client:
        session = client.sessions.create("gone", **LORA)
        admin.tenants.delete("leaving")
    admin.tenants.create("leaving")  # the name again: a new tenant, which sees nothing of it
    with Client(server.address, admin.tenants.issue_token("leaving").token) as client:
        assert client.sessions.list() == []
        with pytest.raises(NotFound):
            Session(client.sessions, session.info).optim_step()
        with pytest.raises(NotFound):
            client.sessions.get(session.id)


def test_an_idempotency_key_answers_the_session_it_opened(server, admin):
    with tenant_client(server, admin, "retrier", max_sessions=1) as client:
        first = client.sessions.create("again", **LORA, idempotency_key="k-1")
        assert client.sessions.create("again", **LORA, idempotency_key="k-1").id == first.id
        with pytest.raises(InvalidArgument, match="idempotency key 'k-1'"):
            client.sessions.create("again", rank=8, idempotency_key="k-1")
        first.close()


def test_an_idle_session_is_closed_and_frees_its_place(tmp_path):
    with running_server(tmp_path, "--session-idle-timeout", "0.5") as server, \
            Client(server.address, server.admin_token) as admin, \
            tenant_client(server, admin, "idle", max_sessions=1) as client:
        session = client.sessions.create("sleepy", **LORA)
        deadline = time.monotonic() + 30
        while session.refresh().state == "open" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session.info.state == "closed"
        assert "idle for more than 0.5 s" in session.info.close_reason
        with pytest.raises(FailedPrecondition, match="--session-idle-timeout"):
            session.optim_step()
        client.sessions.create("awake", **LORA).close()  # its place is free


def test_the_async_client_drives_a_session(server, admin):
    admin.tenants.create("async-rl")
    token = admin.tenants.issue_token("async-rl").token

    async def run():
        async with AsyncClient(server.address, token) as client:
            session = await client.sessions.create("apolicy", **LORA, lr=0.05)
            sample = await session.sample(prompt_token_ids=PROMPT, max_tokens=4, logprobs=0,
                                          ignore_eos=True)
            result = await session.forward_backward([example_of(sample.token_ids)])
            step = await session.optim_step()
            version = await session.save()
            listed = await client.sessions.list()
            got = await client.sessions.get(session.id)
            closed = await session.close()
            return sample, result, step, version, listed, got, closed

    sample, result, step, version, listed, got, closed = asyncio.run(run())
    assert sample.weights_version == 0 and len(sample.token_ids) == 4
    assert result.loss is not None and (step.steps, step.weights_version) == (1, 1)
    assert version.ref == "apolicy@v1"
    assert [s.id for s in listed] == [got.id] and got.info.state == "open"
    assert closed.state == "closed"
