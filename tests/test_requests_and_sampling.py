"""Request validation, the JSONL request file, and seeded sampling."""

from __future__ import annotations

import json
import re

import pytest
from conftest import tiny_hf_model
from engine_helpers import run_to_completion

from cotune.engine.engine import Engine
from cotune.engine.sampling import SamplingParams
from cotune.model.loading import load_model
from cotune.requests_file import RequestFileError, read_requests


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_hf_model("llama2").save_pretrained(path)
    return path


@pytest.fixture
def engine(base_dir):
    return Engine(load_model(base_dir))


def _generate(engine, prompt, params, stop_token_ids=()):
    engine.stop_token_ids = set(stop_token_ids)
    seq = engine.add(prompt, params)
    run_to_completion(engine)
    return seq


@pytest.mark.parametrize("prompt, params, message", [
    ([], {}, "non-empty prompt"),
    ([5, 320], {}, r"outside the vocabulary \[0, 320\)"),
    ([1] * 250, dict(max_tokens=7), "exceeds the model's context of 256"),
])
def test_invalid_prompt_is_refused_before_any_work(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add(prompt, SamplingParams(**params))
    assert not engine.has_work


def test_same_seed_gives_the_same_sample_and_others_differ(engine):
    def run(seed):
        params = SamplingParams(max_tokens=24, temperature=1.5, seed=seed)
        return _generate(engine, [3, 1, 4], params).output_ids

    assert run(7) == run(7)
    assert len({tuple(run(s)) for s in range(4)}) > 1


def test_generation_stops_at_an_end_of_sequence_token_and_says_so(engine):
    greedy = _generate(engine, [9, 8, 7], SamplingParams(max_tokens=6))
    assert greedy.finish_reason == "length" and len(greedy.output_ids) == 6
    stop = greedy.output_ids[2]
    stopped = _generate(engine, [9, 8, 7], SamplingParams(max_tokens=6), {stop})
    first = greedy.output_ids.index(stop)
    assert stopped.output_ids == greedy.output_ids[: first + 1]
    assert stopped.finish_reason == "stop"
    ignored = _generate(engine, [9, 8, 7], SamplingParams(max_tokens=6, ignore_eos=True), {stop})
    assert ignored.output_ids == greedy.output_ids


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
    pytest.param("[" * 100_000 + "]" * 100_000, r"JSON nested too deeply \(more than 100 levels",
                 id="nested-100000-deep"),
])
def test_bad_request_line_is_refused_naming_its_line(tmp_path, line, message):
    path = _file(tmp_path, '{"prompt": "fine"}', line)
    with pytest.raises(RequestFileError, match=f"{re.escape(str(path))}:2: {message}"):
        read_requests(path)


def test_empty_request_file_is_refused(tmp_path):
    with pytest.raises(RequestFileError, match="holds no requests"):
        read_requests(_file(tmp_path, "", "  "))
