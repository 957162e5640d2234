"""Completions and chat completions through the OpenAI-compatible front of a real
`cotune serve --http-port`, called with the real `openai` client: the same text as gRPC and as
PEFT, streamed and not, its usage, choices, stops and logprobs, the errors in OpenAI's form
with the gRPC services' own checks, dropped streams, load, and the `protocol` label."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import httpx2 as httpx
import openai
import pytest
from conftest import tiny_hf_model
from peft_reference import peft_with_adapters, reference_greedy
from server_helpers import running_server, tiny_adapter_dir
from test_metrics import free_port, scrape, value
from transformers import AutoTokenizer
from wire import Caller

from cotune.v1 import adapters_pb2, inference_pb2

PROMPT = "the cat sat on"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the answer?"}]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("http-generation")


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(root, metrics_port):
    with running_server(root, "--http-port", "0", "--metrics-port", str(metrics_port)) as s:
        yield s


@pytest.fixture(scope="module")
def tenants(server, admin, root):
    """acme: adapter "helper" in two versions; globex: adapter "secret"; tight: one
    generation in flight at most; metered: 20 tokens a minute."""
    adapters = root / "adapters"
    tokens = {name: admin.new_tenant(name, **quotas) for name, quotas in (
        ("acme", {}), ("globex", {}), ("tight", {"max_queued_requests": 1}),
        ("metered", {"max_tokens_per_minute": 20}))}
    for tenant, name, seed in (("acme", "helper", 1), ("acme", "helper", 2),
                               ("globex", "secret", 3)):
        caller = Caller(server.address, tokens[tenant])
        caller.upload(name, tiny_adapter_dir(adapters / f"{name}-{seed}", seed=seed))
        caller.close()
    return tokens


@pytest.fixture(scope="module")
def acme(server, tenants):
    return client(server, tenants["acme"])


@pytest.fixture(scope="module")
def grpc_acme(server, tenants):
    caller = Caller(server.address, tenants["acme"])
    yield caller
    caller.close()


@pytest.fixture(scope="module")
def base(acme) -> str:
    return acme.models.list().data[0].id


def client(server, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url(), api_key=token, max_retries=0)


def grpc_text(caller: Caller, max_tokens: int, adapter: str = "", **inputs) -> str:
    request = inference_pb2.GenerateRequest(
        adapter=adapter, sampling=inference_pb2.SamplingParams(max_tokens=max_tokens), **inputs)
    responses = caller.inference.Generate(request, metadata=caller.metadata, timeout=60)
    return "".join(r.text for r in responses)


def grpc_chat(messages: list[dict]) -> inference_pb2.ChatMessages:
    return inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(**m) for m in messages])


def raw_post(server, token: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.openai_url() + path, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {token}"})


def test_a_completion_has_text_usage_and_names_the_version_served(acme, grpc_acme):
    reply = acme.completions.create(model="helper", prompt=PROMPT, max_tokens=5)
    prompt_tokens = len(grpc_acme.inference.Tokenize(
        inference_pb2.TokenizeRequest(text=PROMPT), metadata=grpc_acme.metadata).token_ids)
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
    assert reply.model == "helper@v2" and reply.created > 0
    (choice,) = reply.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (prompt_tokens, 5, prompt_tokens + 5)


@pytest.mark.parametrize("adapter", ["", "helper@v1", "helper"])
def test_greedy_completions_and_chat_equal_grpc(acme, grpc_acme, base, adapter):
    text = acme.completions.create(model=adapter or base, prompt=PROMPT, max_tokens=12)
    assert text.choices[0].text == grpc_text(grpc_acme, 12, adapter, prompt=PROMPT)
    chat = acme.chat.completions.create(model=adapter or base, messages=CHAT, max_tokens=12)
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == grpc_text(grpc_acme, 12, adapter,
                                                        chat=grpc_chat(CHAT))


def test_greedy_tokens_for_an_uploaded_adapter_equal_peft(root, acme, grpc_acme):
    """Token ids in, greedy tokens out (as each token's text and the text they make),
    against transformers + PEFT on the same tiny base and adapter."""
    adapter = tiny_adapter_dir(root / "parity", seed=7)
    grpc_acme.upload("parity", adapter)
    tokenizer = AutoTokenizer.from_pretrained(root / "tiny-model")
    prompt = tokenizer(PROMPT).input_ids
    reply = acme.completions.create(model="parity", prompt=prompt, max_tokens=16, logprobs=0)
    expected = reference_greedy(peft_with_adapters(tiny_hf_model("llama2"), [adapter]), prompt,
                                0, 16)
    choice = reply.choices[0]
    got = choice.logprobs.tokens
    assert got == [tokenizer.decode([t]) for t in expected[:len(got)]]
    assert len(got) == 16 or choice.finish_reason == "stop"
    assert choice.text == tokenizer.decode(expected[:len(got)])


def test_streams_join_to_the_unstreamed_text_and_end_with_done(server, tenants, acme, base):
    whole = acme.completions.create(model=base, prompt=PROMPT, max_tokens=10).choices[0].text
    chunks = list(acme.completions.create(model=base, prompt=PROMPT, max_tokens=10,
                                          stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.usage is None and c.id == chunks[0].id for c in chunks)
    chat_whole = acme.chat.completions.create(model=base, messages=CHAT, max_tokens=10)
    chat_chunks = list(acme.chat.completions.create(model=base, messages=CHAT, max_tokens=10,
                                                    stream=True))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chat_chunks)
    assert "".join(c.choices[0].delta.content for c in chat_chunks) == \
        chat_whole.choices[0].message.content
    with httpx.stream("POST", server.openai_url() + "/completions", timeout=60,
                      json={"model": base, "prompt": PROMPT, "max_tokens": 3, "stream": True},
                      headers={"Authorization": f"Bearer {tenants['acme']}"}) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        body = reply.read().decode()
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_include_usage_adds_a_last_chunk_with_the_usage_and_no_choices(acme, base):
    chunks = list(acme.chat.completions.create(
        model=base, messages=CHAT, max_tokens=4, stream=True, n=2,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert last.usage.total_tokens == last.usage.prompt_tokens + 8
    assert all(c.usage is None for c in chunks[:-1])
    finished = {c.choices[0].index for c in chunks[:-1] if c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_n_choices_with_a_seed_use_seed_plus_index_and_count_the_prompt_once(acme, base):
    def sample(seed: int, n: int):
        return acme.completions.create(model=base, prompt=PROMPT, max_tokens=8, n=n,
                                       temperature=1.0, seed=seed)

    two = sample(7, 2)
    texts = [c.text for c in sorted(two.choices, key=lambda c: c.index)]
    assert [c.index for c in two.choices] == [0, 1] and texts[0] != texts[1]
    assert texts == [sample(7, 1).choices[0].text, sample(8, 1).choices[0].text]
    assert two.usage.completion_tokens == 16
    assert two.usage.prompt_tokens == sample(7, 1).usage.prompt_tokens  # one prompt, as OpenAI


CONTEXT = 256  # the tiny model's max_position_embeddings


def test_a_chat_without_max_tokens_may_fill_the_context(acme, base):
    """As OpenAI's chat: no max_tokens is as many as the context leaves, not Generate's 16."""
    reply = acme.chat.completions.create(model=base, messages=CHAT)
    usage, finish = reply.usage, reply.choices[0].finish_reason
    assert finish in ("stop", "length")
    if finish == "length":
        assert usage.prompt_tokens + usage.completion_tokens == CONTEXT
    else:
        assert usage.prompt_tokens + usage.completion_tokens < CONTEXT


def test_generate_with_max_tokens_zero_fills_the_context_and_refuses_a_full_prompt(grpc_acme):
    def generate(prompt_ids: list[int]):
        return list(grpc_acme.inference.Generate(inference_pb2.GenerateRequest(
            prompt_token_ids=inference_pb2.TokenIds(ids=prompt_ids),
            sampling=inference_pb2.SamplingParams(max_tokens=0, ignore_eos=True)),
            metadata=grpc_acme.metadata, timeout=120))

    responses = generate([5] * 200)
    assert sum(len(r.token_ids) for r in responses) == CONTEXT - 200
    assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    with pytest.raises(grpc.RpcError) as refused:
        generate([5] * CONTEXT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fills the model's context of 256 tokens" in refused.value.details()


def test_several_prompts_and_token_ids_are_prompts_too(acme, grpc_acme, base):
    ids = list(grpc_acme.inference.Tokenize(inference_pb2.TokenizeRequest(text=PROMPT),
                                            metadata=grpc_acme.metadata).token_ids)
    reply = acme.completions.create(model=base, prompt=[PROMPT, ids, "a capital"], max_tokens=6)
    texts = [c.text for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert texts[0] == texts[1] == grpc_text(grpc_acme, 6, prompt=PROMPT)
    assert texts[2] == grpc_text(grpc_acme, 6, prompt="a capital")


def test_a_stop_string_ends_the_text_before_it(acme, base):
    whole = acme.completions.create(model=base, prompt=PROMPT, max_tokens=16).choices[0].text
    stop = next(whole[i:i + 2] for i in range(4, len(whole) - 2)
                if whole[i:i + 2].isprintable() and "\ufffd" not in whole[i:i + 2])
    for form in (stop, [stop, "never in the text"]):
        choice = acme.completions.create(model=base, prompt=PROMPT, max_tokens=16,
                                         stop=form).choices[0]
        assert choice.text == whole[:whole.index(stop)] and choice.finish_reason == "stop"


def test_logprobs_in_openais_forms(acme, base):
    choice = acme.completions.create(model=base, prompt=PROMPT, max_tokens=6,
                                     logprobs=2).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)  # texts may coincide
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    # greedy: each token is the best alternative
    assert [max(top.values()) for top in logprobs.top_logprobs] == logprobs.token_logprobs
    chat = acme.chat.completions.create(model=base, messages=CHAT, max_tokens=6, logprobs=True,
                                        top_logprobs=3).choices[0]
    content = chat.logprobs.content
    assert len(content) == 6 and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.logprob == e.top_logprobs[0].logprob <= 0 for e in content)
    assert all(e.bytes is None or bytes(e.bytes).decode() == e.token for e in content)
    plain = acme.chat.completions.create(model=base, messages=CHAT, max_tokens=2).choices[0]
    assert plain.logprobs is None


def test_an_unknown_model_and_another_tenants_adapter_are_404_on_model(acme, base):
    for model in ("nothing", "secret", "helper@v9"):
        with pytest.raises(openai.NotFoundError) as caught:
            acme.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert caught.value.body["param"] == "model", model
        assert base in caught.value.body["message"]


def test_values_are_checked_by_the_grpc_services_and_say_the_same(acme, grpc_acme, base):
    with pytest.raises(grpc.RpcError) as grpc_error:
        list(grpc_acme.inference.Generate(inference_pb2.GenerateRequest(
            prompt=PROMPT, sampling=inference_pb2.SamplingParams(temperature=-1)),
            metadata=grpc_acme.metadata, timeout=60))
    with pytest.raises(openai.BadRequestError) as caught:
        acme.completions.create(model=base, prompt=PROMPT, temperature=-1)
    assert caught.value.body["message"] == grpc_error.value.details()
    with pytest.raises(openai.BadRequestError) as caught:
        acme.chat.completions.create(model=base, messages=[{"role": "tool", "content": "x"}])
    assert "accepted: system, user, assistant" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        acme.chat.completions.create(model=base, messages=[])
    assert "chat has no messages" in caught.value.body["message"]


@pytest.mark.parametrize("path, fields, param, says", [
    ("/completions", {"temperature": "hot"}, "temperature", "accepted: a number"),
    ("/completions", {"max_tokens": 1.5}, "max_tokens", "accepted: an integer"),
    ("/completions", {"max_tokens": 2**40}, "max_tokens", "out of range"),
    ("/completions", {"stream": "yes"}, "stream", "true or false"),
    ("/completions", {"n": 0}, "n", "n >= 1"),
    ("/completions", {"n": 17}, "n", "at most 16 choices"),
    ("/completions", {"prompt": []}, "prompt", "empty array"),
    ("/completions", {"prompt": [[1, 2], {"x": 1}]}, "prompt[1]", "token ids"),
    ("/completions", {"stop": [1]}, "stop[0]", "a string"),
    ("/completions", {"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ("/completions", {"echo": True}, "echo", "not supported"),
    ("/completions", {"temprature": 1}, "temprature", "unknown field"),
    ("/completions", {"stream_options": {"include_usage": True}}, "stream_options",
     "stream: true"),
    ("/chat/completions", {"tools": [{"type": "function"}]}, "tools", "not supported"),
    ("/chat/completions", {"top_logprobs": 2}, "top_logprobs", "logprobs: true"),
    ("/chat/completions", {"messages": "hi"}, "messages", "an array"),
    ("/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]",
     "text parts only"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "n"}]},
     "messages[0]", "accepted: role, content"),
])
def test_fields_of_the_wrong_type_or_unsupported_are_400_naming_them(
        server, tenants, base, path, fields, param, says):
    body = {"model": base, **({"messages": CHAT} if path.startswith("/chat") else
                              {"prompt": PROMPT}), "max_tokens": 2, **fields}
    reply = raw_post(server, tenants["acme"], path, body)
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == param and says in error["message"]


def test_neutral_values_of_unsupported_fields_and_user_are_accepted(acme, base):
    reply = acme.chat.completions.create(
        model=base, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        max_completion_tokens=2, presence_penalty=0, frequency_penalty=0, user="someone")
    assert reply.usage.completion_tokens == 2


def test_a_tenant_over_its_quota_gets_429_with_retry_after(server, tenants, base):
    metered = client(server, tenants["metered"])
    metered.completions.create(model=base, prompt=PROMPT, max_tokens=24)  # past 20 a minute
    reply = raw_post(server, tenants["metered"], "/completions",
                     {"model": base, "prompt": PROMPT, "max_tokens": 2})
    assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
    assert "max_tokens_per_minute=20" in reply.json()["error"]["message"]


def test_a_dropped_stream_is_cancelled_in_the_engine_and_frees_its_slot(
        server, tenants, base, metrics_port):
    """tight may have one generation in flight: after a stream it dropped, the next request
    is admitted, and the dropped one ended CANCELLED before its tokens were all generated."""
    tight = client(server, tenants["tight"])
    labels = dict(tenant="tight", protocol="http")
    before = scrape(metrics_port)
    stream = tight.completions.create(model=base, prompt="the", max_tokens=240, stream=True)
    next(iter(stream))
    stream.close()

    def grew(name, **more):
        return value(scrape(metrics_port), name, **labels, **more) - \
            value(before, name, **labels, **more)

    deadline = time.monotonic() + 10
    while grew("cotune_requests_total", status="CANCELLED") < 1:
        assert time.monotonic() < deadline, "the dropped stream did not end in the engine"
        time.sleep(0.05)
    assert grew("cotune_generated_tokens_total") < 240
    assert tight.completions.create(model=base, prompt="the", max_tokens=2).choices


def test_fifty_concurrent_streams_all_complete(server, tenants, base):
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.openai_url(), api_key=tenants["acme"],
                                      max_retries=0) as concurrent:
            async def one(i: int) -> str:
                stream = await concurrent.chat.completions.create(
                    model=base, messages=[{"role": "user", "content": f"question {i}"}],
                    max_tokens=6, stream=True)
                reasons = [c.choices[0].finish_reason async for c in stream]
                return reasons[-1]
            return await asyncio.gather(*(one(i) for i in range(50)))

    assert asyncio.run(run()) == ["length"] * 50


def test_calls_count_under_the_protocol_they_came_through(acme, grpc_acme, base,
                                                          metrics_port):
    before = scrape(metrics_port)
    acme.completions.create(model=base, prompt=PROMPT, max_tokens=3)
    grpc_acme.generate(PROMPT, max_tokens=3)
    # any other value of the metadata counts as grpc: the label set stays bounded
    list(grpc_acme.inference.Generate(
        inference_pb2.GenerateRequest(prompt=PROMPT), timeout=60,
        metadata=[*grpc_acme.metadata, ("cotune-protocol", "smtp")]))
    after = scrape(metrics_port)

    def grew(name, protocol):
        return value(after, name, tenant="acme", protocol=protocol) - \
            value(before, name, tenant="acme", protocol=protocol)

    assert grew("cotune_requests_total", "http") == 1
    assert grew("cotune_requests_total", "grpc") == 2
    assert grew("cotune_generated_tokens_total", "http") == 3
    assert grew("cotune_time_to_first_token_seconds_count", "http") == 1
    assert not [k for k in after if ("protocol", "smtp") in k[1]]


def test_while_draining_the_front_answers_503(tmp_path):
    """An upload held open keeps the server draining after SIGTERM; meanwhile a completion
    is refused as the gRPC services refuse it, UNAVAILABLE, which is 503."""
    with running_server(tmp_path, "--http-port", "0", "--grace-period", "10") as server:
        release = threading.Event()
        holder = Caller(server.address, server.admin_token)

        def upload():
            yield adapters_pb2.CreateAdapterRequest(
                header=adapters_pb2.CreateAdapterHeader(name="held"))
            release.wait(20)

        held = holder.adapters.CreateAdapter.future(upload(), metadata=holder.metadata)
        url, token = server.openai_url(), server.admin_token
        time.sleep(0.5)  # the upload is in flight
        server.proc.send_signal(signal.SIGTERM)
        try:
            deadline = time.monotonic() + 10
            while httpx.get(url.removesuffix("/v1") + "/health", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, "the server did not start draining"
                time.sleep(0.05)
            reply = httpx.post(url + "/completions", timeout=30,
                               json={"model": "tiny-model", "prompt": PROMPT, "max_tokens": 2},
                               headers={"Authorization": f"Bearer {token}"})
            assert reply.status_code == 503
            assert reply.json()["error"]["type"] == "service_unavailable_error"
        finally:
            release.set()
            held.cancel()
            holder.close()
