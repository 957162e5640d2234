"""The fine-tuning data reader, against the real tokenizer of the embedded SmolLM2."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import transformers

from cotune.engine.training_data import (
    DataError,
    Dataset,
    Example,
    read_training_data,
    split_eval,
)

# SmolLM2's chat template closes every turn with <|im_end|> and a newline.
END_OF_TURN = "<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer():
    from cotune.model.default_model import resolve_model_path

    return transformers.AutoTokenizer.from_pretrained(resolve_model_path("default"))


def write(tmp_path, *lines, name="data.jsonl"):
    """A JSONL file of `lines`: objects are dumped as JSON, strings are written as they are."""
    path = tmp_path / name
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines), encoding="utf-8")
    return path


def masked_runs(tokenizer, example: Example) -> list[str]:
    """The decoded text of each contiguous run of target tokens."""
    runs, current = [], []
    for token, target in zip(example.token_ids, example.loss_mask):
        if target:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


# --- the three forms ------------------------------------------------------------------------

def test_prompt_completion_targets_completion_and_eos(tmp_path, tokenizer):
    prompt, completion = "Translate to French: cheese", " fromage"
    data = read_training_data(write(tmp_path, {"prompt": prompt, "completion": completion}),
                              tokenizer)
    (example,) = data.examples
    prompt_ids = tokenizer(prompt).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    assert example.token_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert example.loss_mask == [False] * len(prompt_ids) + [True] * (len(completion_ids) + 1)
    assert masked_runs(tokenizer, example) == [completion + tokenizer.eos_token]
    assert data.truncated == 0


def test_messages_target_each_assistant_turn_with_its_end_of_turn(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    (example,) = read_training_data(write(tmp_path, {"messages": messages}),
                                    tokenizer).examples
    assert example.token_ids == chat_ids(tokenizer, messages)
    assert masked_runs(tokenizer, example) == ["Paris." + END_OF_TURN, "Rome." + END_OF_TURN]
    # each turn starts right after the prompt that precedes it at generation time
    for i in (2, 4):
        prompt = chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        assert example.token_ids[:len(prompt)] == prompt
        previous = len(chat_ids(tokenizer, messages[:i - 1]))
        assert not any(example.loss_mask[previous:len(prompt)])  # user turn, "assistant\n"
        assert example.loss_mask[len(prompt)]


def test_messages_without_system_keep_the_templates_default_system_prompt(tmp_path,
                                                                        tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    (example,) = read_training_data(write(tmp_path, {"messages": messages}),
                                    tokenizer).examples
    assert example.token_ids == chat_ids(tokenizer, messages)
    assert tokenizer.decode(example.token_ids).startswith("<|im_start|>system\nYou are a")
    # a trailing user turn is context, not a target
    assert masked_runs(tokenizer, example) == ["Hello!" + END_OF_TURN]
    assert not example.loss_mask[-1]


def test_assistant_content_starting_with_whitespace_starts_on_a_token_boundary(tmp_path,
                                                                               tokenizer):
    # tokenized whole, "assistant\n" + "\n\nX" merges newlines across the turn's start
    messages = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "\n\nX"}]
    (example,) = read_training_data(write(tmp_path, {"messages": messages}),
                                    tokenizer).examples
    prompt = chat_ids(tokenizer, messages[:1], add_generation_prompt=True)
    assert example.token_ids[:len(prompt)] == prompt
    assert example.loss_mask == [False] * len(prompt) + [True] * (len(example.token_ids)
                                                                  - len(prompt))
    assert tokenizer.decode(example.token_ids) == tokenizer.apply_chat_template(
        messages, tokenize=False)
    assert masked_runs(tokenizer, example) == ["\n\nX" + END_OF_TURN]


def test_text_targets_every_token_but_the_first(tmp_path, tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    (example,) = read_training_data(write(tmp_path, {"text": text}), tokenizer).examples
    assert example.token_ids == tokenizer(text).input_ids
    assert example.loss_mask == [False] + [True] * (len(example.token_ids) - 1)


def test_blank_lines_are_skipped(tmp_path, tokenizer):
    path = write(tmp_path, {"text": "one two"}, "", "   ", {"text": "three four"})
    assert len(read_training_data(path, tokenizer).examples) == 2


# --- truncation and provenance -------------------------------------------------------------

def test_truncation_keeps_the_first_max_length_tokens_and_counts(tmp_path, tokenizer):
    long_text = " ".join(["word"] * 40)
    path = write(tmp_path, {"text": long_text}, {"text": "short one"}, {"text": long_text})
    data = read_training_data(path, tokenizer, max_length=8)
    assert data.truncated == 2
    assert data.examples[0].token_ids == tokenizer(long_text).input_ids[:8]
    assert data.examples[0].loss_mask == [False] + [True] * 7
    assert data.examples[1].token_ids == tokenizer("short one").input_ids


def test_fingerprint_is_the_sha256_of_the_bytes_and_follows_content(tmp_path, tokenizer):
    a = write(tmp_path, {"text": "alpha beta"}, name="a.jsonl")
    b = write(tmp_path, {"text": "alpha beta"}, name="b.jsonl")
    c = write(tmp_path, {"text": "alpha gamma"}, name="c.jsonl")
    fa, fb, fc = (read_training_data(p, tokenizer).fingerprint for p in (a, b, c))
    assert fa == hashlib.sha256(a.read_bytes()).hexdigest()
    assert fa == fb
    assert fa != fc


# --- split ---------------------------------------------------------------------------------

def toy_dataset(n: int) -> Dataset:
    return Dataset([Example([i, i + 1], [False, True]) for i in range(n)], "0" * 64, 0)


@pytest.mark.parametrize("n, fraction, expected", [
    (100, 0.1, 10), (10, 0.25, 2), (7, 0.5, 4), (2, 0.01, 1), (3, 0.1, 1), (1, 0.5, 0),
    (2, 0.9, 1), (50, 0.0, 0),
])
def test_split_sizes(n, fraction, expected):
    train, held = split_eval(toy_dataset(n), fraction, seed=0)
    assert len(held) == expected
    assert len(train) == n - expected


def test_split_is_deterministic_disjoint_and_in_file_order():
    data = toy_dataset(30)
    train, held = split_eval(data, 0.2, seed=7)
    assert (train, held) == split_eval(data, 0.2, seed=7)
    assert split_eval(data, 0.2, seed=8)[1] != held
    firsts = [e.token_ids[0] for e in train + held]
    assert sorted(firsts) == list(range(30))
    assert [e.token_ids[0] for e in held] == sorted(e.token_ids[0] for e in held)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_fraction_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        split_eval(toy_dataset(10), fraction, seed=0)


# --- errors: each names path:line ----------------------------------------------------------

GOOD = {"prompt": "p", "completion": "c"}
GOOD_CHAT = {"messages": [{"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]}


def assert_error(tmp_path, tokenizer, lines, line: int, pattern: str, **kwargs):
    path = write(tmp_path, *lines)
    with pytest.raises(DataError, match=pattern) as info:
        read_training_data(path, tokenizer, **kwargs)
    assert str(info.value).startswith(f"{path}:{line}: ")
    return str(info.value)


def test_error_invalid_json(tmp_path, tokenizer):
    message = assert_error(tmp_path, tokenizer, [GOOD, '{"prompt": "p",'], 2, "invalid JSON")
    assert '{"prompt": str, "completion": str}' in message  # says what is accepted


@pytest.mark.parametrize("depth", [100, 100_000])  # with the line's object, 101 levels and more
def test_error_nested_too_deeply(tmp_path, tokenizer, depth):
    line = '{"text": ' + "[" * depth + "]" * depth + "}"
    message = assert_error(tmp_path, tokenizer, [GOOD, line], 2,
                           r"JSON nested too deeply \(more than 100 levels of arrays and "
                           r"objects\); accepted: at most 100 levels")
    assert '{"prompt": str, "completion": str}' in message  # says what is accepted


def test_error_not_an_object(tmp_path, tokenizer):
    assert_error(tmp_path, tokenizer, [GOOD, '["p", "c"]'], 2, "list is not an object")


def test_error_unknown_field(tmp_path, tokenizer):
    assert_error(tmp_path, tokenizer, [GOOD, dict(GOOD, weight=2)], 2,
                 "unknown field 'weight' in the prompt/completion form")


def test_error_missing_field(tmp_path, tokenizer):
    assert_error(tmp_path, tokenizer, [{"prompt": "p"}], 1,
                 "missing field 'completion' in the prompt/completion form")


def test_error_no_known_field(tmp_path, tokenizer):
    assert_error(tmp_path, tokenizer, [{"input": "x", "output": "y"}], 1,
                 "no known fields \\(found 'input', 'output'\\)")


def test_error_wrong_type(tmp_path, tokenizer):
    assert_error(tmp_path, tokenizer, [GOOD, {"prompt": "p", "completion": 3}], 2,
                 "'completion' is a JSON number; it must be a non-empty string")


def test_error_empty_string(tmp_path, tokenizer):
    assert_error(tmp_path, tokenizer, [{"text": ""}], 1, "'text' is empty")


def test_error_messages_not_a_list(tmp_path, tokenizer):
    assert_error(tmp_path, tokenizer, [{"messages": "hi"}], 1,
                 "'messages' is a JSON string; it must be an array")


def test_error_empty_messages(tmp_path, tokenizer):
    assert_error(tmp_path, tokenizer, [GOOD_CHAT, {"messages": []}], 2, "'messages' is empty")


def test_error_message_not_an_object(tmp_path, tokenizer):
    assert_error(tmp_path, tokenizer, [{"messages": ["hi"]}], 1,
                 "messages\\[0\\] is a JSON string")


def test_error_message_missing_content(tmp_path, tokenizer):
    assert_error(tmp_path, tokenizer, [{"messages": [{"role": "user"}]}], 1,
                 "messages\\[0\\] has missing field 'content'")


def test_error_empty_message_content(tmp_path, tokenizer):
    chat = {"messages": [{"role": "user", "content": "u"},
                         {"role": "assistant", "content": ""}]}
    assert_error(tmp_path, tokenizer, [chat], 1, "messages\\[1\\].content is empty")


def test_error_unknown_role(tmp_path, tokenizer):
    chat = {"messages": [{"role": "tool", "content": "x"},
                         {"role": "assistant", "content": "a"}]}
    assert_error(tmp_path, tokenizer, [GOOD_CHAT, chat], 2,
                 "role 'tool'; accepted roles are 'system', 'user', 'assistant'")


def test_error_no_assistant_turn(tmp_path, tokenizer):
    assert_error(tmp_path, tokenizer, [{"messages": [{"role": "user", "content": "u"}]}], 1,
                 "no assistant message")


def test_error_conversation_starting_with_assistant(tmp_path, tokenizer):
    chat = {"messages": [{"role": "assistant", "content": "a"}]}
    assert_error(tmp_path, tokenizer, [chat], 1, "starts with a system or user message")


def test_error_mixed_forms_names_the_first_differing_line(tmp_path, tokenizer):
    message = assert_error(tmp_path, tokenizer, [GOOD, GOOD, GOOD_CHAT, {"text": "t"}], 3,
                           "messages form but line 1 is in the prompt/completion form")
    assert "one form throughout" in message


def test_error_no_target_after_truncation(tmp_path, tokenizer):
    long_prompt = {"prompt": " ".join(["word"] * 20), "completion": "c"}
    assert_error(tmp_path, tokenizer, [GOOD, long_prompt], 2,
                 "no target token within the first 8 tokens", max_length=8)


def test_error_text_of_one_token_has_no_target(tmp_path, tokenizer):
    assert len(tokenizer("a").input_ids) == 1
    assert_error(tmp_path, tokenizer, [{"text": "a"}], 1, "1 token and so nothing to predict")


def test_error_empty_file(tmp_path, tokenizer):
    for content in ("", "\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        with pytest.raises(DataError, match=f"^{path}: the file holds no examples"):
            read_training_data(path, tokenizer)


def test_error_not_utf8(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok text"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=f"^{path}:2: not UTF-8"):
        read_training_data(path, tokenizer)


def test_error_missing_file(tmp_path, tokenizer):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match=f"^{path}: cannot read"):
        read_training_data(path, tokenizer)


def test_error_template_not_prefix_stable(tmp_path, tokenizer):
    # a template that announces the number of messages first renders no prefix of itself
    unstable = copy.copy(tokenizer)
    unstable.chat_template = ("{{ messages | length }}{% for m in messages %}"
                              "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    path = write(tmp_path, GOOD_CHAT)
    with pytest.raises(DataError, match=f"^{path}:1: .*not prefix-stable"):
        read_training_data(path, unstable)


def test_error_template_rejects_conversation(tmp_path, tokenizer):
    strict = copy.copy(tokenizer)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                            "{{ raise_exception('no system messages') }}{% endif %}"
                            "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    chat = {"messages": [{"role": "system", "content": "s"}] + GOOD_CHAT["messages"]}
    path = write(tmp_path, GOOD_CHAT, chat)
    with pytest.raises(DataError, match=f"^{path}:2: .*rejects.*no system messages"):
        read_training_data(path, strict)
