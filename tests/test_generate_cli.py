"""`cotune generate` as users run it, on the real default model, against transformers + PEFT."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft_reference import peft_with_adapters, save_random_adapters

from cotune.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

COTUNE = str(Path(sys.executable).parent / "cotune")


@pytest.fixture(scope="module")
def env(smollm2):
    """The environment of a user whose cache already holds the converted default model."""
    _, checkpoint = smollm2
    return dict(os.environ, COTUNE_CACHE_DIR=str(checkpoint.parent.parent))


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory):
    hf_model, checkpoint = smollm2
    dirs = save_random_adapters(hf_model, tmp_path_factory.mktemp("cli-adapters"), 2,
                                random.Random(11), std=0.02)
    return dirs, peft_with_adapters(copy.deepcopy(hf_model), dirs), load_tokenizer(checkpoint)


def _cotune(args, env, stdin=None):
    return subprocess.run([COTUNE, *args], env=env, capture_output=True, text=True, timeout=600)


def _reference(peft_model, prompt_ids, adapter_index, max_tokens, eos_id):
    kwargs = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos_id,
                  pad_token_id=eos_id)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        if adapter_index is None:
            with peft_model.disable_adapter():
                out = peft_model.generate(input_ids=ids, **kwargs)
        else:
            peft_model.set_adapter(f"a{adapter_index}")
            out = peft_model.generate(input_ids=ids, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def test_requests_file_runs_as_one_mixed_batch_in_file_order(env, adapters, tmp_path):
    dirs, reference, tokenizer = adapters
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                         tokenize=False, add_generation_prompt=True)
    lines = [
        {"prompt": chat, "adapter": str(dirs[0]), "max_tokens": 12, "temperature": 0},
        {"prompt_token_ids": tokenizer("The sky is").input_ids, "max_tokens": 9},
        {"prompt": "def add(a, b):", "adapter": str(dirs[1]), "max_tokens": 16},
        {"prompt": chat, "adapter": None, "max_tokens": 12, "temperature": 0.0},
        {"prompt": "Paris is", "adapter": str(dirs[0]), "max_tokens": 5},
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = _cotune(["generate", "--model", "default", "--requests", str(requests)], env)
    assert result.returncode == 0, result.stderr
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(outputs) == len(lines)
    for line, output in zip(lines, outputs):
        prompt_ids = line.get("prompt_token_ids") or tokenizer(line["prompt"]).input_ids
        adapter = line.get("adapter")
        index = None if adapter is None else [str(d) for d in dirs].index(adapter)
        expected = _reference(reference, prompt_ids, index, line["max_tokens"],
                              tokenizer.eos_token_id)
        assert output["token_ids"] == expected, line
        assert output["text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_single_prompt_with_adapter_prints_the_completion(env, adapters):
    dirs, reference, tokenizer = adapters
    prompt = "The capital of France is"
    result = _cotune(["generate", "--model", "default", "--adapter", str(dirs[1]),
                      "--max-tokens", "10", prompt], env)
    assert result.returncode == 0, result.stderr
    expected = _reference(reference, tokenizer(prompt).input_ids, 1, 10, tokenizer.eos_token_id)
    assert result.stdout == tokenizer.decode(expected, skip_special_tokens=True) + "\n"


def test_bad_request_line_fails_the_file_naming_the_line(env, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"prompt": "ok"}\n{"prompt": "x", "max_token": 3}\n')
    result = _cotune(["generate", "--model", "default", "--requests", str(requests)], env)
    assert result.returncode == 2 and result.stdout == ""
    assert f"{requests}:2: unknown fields ['max_token']" in result.stderr


def test_pickled_adapter_is_refused_and_nothing_is_printed(env, tmp_path):
    adapter = tmp_path / "pickled"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04\x95")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"prompt": "hi", "adapter": str(adapter)}) + "\n")
    result = _cotune(["generate", "--model", "default", "--requests", str(requests)], env)
    assert result.returncode == 2 and result.stdout == ""
    assert "adapter_model.bin" in result.stderr and "pickle" in result.stderr
