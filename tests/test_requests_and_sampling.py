"""Request validation, the JSONL request file, and seeded sampling."""

from __future__ import annotations

import json
import re

import pytest
from conftest import tiny_hf_model

from cotune.engine.generate import GenerationRequest, generate
from cotune.model.loading import load_model
from cotune.requests_file import RequestFileError, read_requests


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_hf_model("llama2").save_pretrained(path)
    return load_model(path)


@pytest.mark.parametrize("request_, message", [
    (GenerationRequest([]), "non-empty prompt"),
    (GenerationRequest([5, 320]), r"outside the vocabulary \[0, 320\)"),
    (GenerationRequest([1] * 250, max_tokens=7), "exceeds the model's context of 256"),
    (GenerationRequest([1], max_tokens=0), "max_tokens must be at least 1"),
    (GenerationRequest([1], temperature=-0.5), "temperature must be >= 0"),
])
def test_invalid_request_is_refused_before_any_work(model, request_, message):
    with pytest.raises(ValueError, match=message):
        generate(model, [GenerationRequest([1, 2, 3]), request_], stop_token_ids=set())


def test_same_seed_gives_the_same_sample_and_others_differ(model):
    def run(seed):
        request = GenerationRequest([3, 1, 4], max_tokens=24, temperature=1.5, seed=seed)
        return generate(model, [request], stop_token_ids=set())[0].token_ids

    assert run(7) == run(7)
    assert len({tuple(run(s)) for s in range(4)}) > 1


def test_generation_stops_at_a_stop_token_and_says_so(model):
    greedy = generate(model, [GenerationRequest([9, 8, 7], max_tokens=6)], set())[0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 6
    stop = greedy.token_ids[2]
    stopped = generate(model, [GenerationRequest([9, 8, 7], max_tokens=6)], {stop})[0]
    first = greedy.token_ids.index(stop)
    assert stopped.token_ids == greedy.token_ids[: first + 1]
    assert stopped.finish_reason == "stop"


def _file(tmp_path, *lines):
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_request_file_reads_both_prompt_forms_in_order(tmp_path):
    path = _file(tmp_path, json.dumps({"prompt": "hi", "adapter": "/a", "max_tokens": 3}), "",
                 json.dumps({"prompt_token_ids": [1, 2], "adapter": None, "temperature": 0.5}))
    first, second = read_requests(path)
    assert (first.prompt, first.adapter, first.max_tokens) == ("hi", "/a", 3)
    assert (second.prompt_token_ids, second.adapter, second.temperature) == ([1, 2], None, 0.5)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "a request is a JSON object"),
    ('{"prompt": "x", "max_token": 3}', r"unknown fields \['max_token'\]"),
    ('{"prompt": 5}', "prompt must be str"),
    ('{"prompt": "x", "max_tokens": true}', "max_tokens must be int"),
    ('{"prompt": "x", "prompt_token_ids": [1]}', "give exactly one of prompt or prompt_token_ids"),
    ('{"adapter": null}', "give exactly one of prompt or prompt_token_ids"),
    ('{"prompt_token_ids": [1, "2"]}', "prompt_token_ids must be a list of integers"),
])
def test_bad_request_line_is_refused_naming_its_line(tmp_path, line, message):
    path = _file(tmp_path, '{"prompt": "fine"}', line)
    with pytest.raises(RequestFileError, match=f"{re.escape(str(path))}:2: {message}"):
        read_requests(path)


def test_empty_request_file_is_refused(tmp_path):
    with pytest.raises(RequestFileError, match="holds no requests"):
        read_requests(_file(tmp_path, "", "  "))
